"""The ``cloudckpt`` command: look at, check, copy and clean checkpoints without writing Python.

Each command lives in its own module (``ls``, ``inspect``, ``verify``, ``copy``, ``gc``,
``rm``, ``export``) that calls one documented library function of ``cloudckpt.tools`` with
the parsed arguments and prints its typed result (text, or ``--json``);
``common`` holds what they share - exit codes, one-line errors, progress bars.
A command's module is imported only when it runs, and no command imports a cloud SDK
its URLs do not need (nor tqdm without a terminal to draw on).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from cloudckpt.cli.common import EXIT_CODES_HELP, EXIT_USAGE, parse_duration, parse_size, run_command, setup_logging

_URLS_HELP = """URLs: a plain path or file:///abs/path (local disk), s3://bucket/prefix, gs://bucket/prefix,
or any fsspec protocol. A checkpoint is a path prefix such as s3://bucket/run/ckpt-7 (its objects
are ckpt-7.index and ckpt-7.data-*); its directory is s3://bucket/run.
Credentials and endpoints come from the same places as the library: the boto3 chain
(AWS_ACCESS_KEY_ID, AWS_PROFILE, instance roles) and AWS_ENDPOINT_URL for S3-compatible servers;
google-auth's default chain and STORAGE_EMULATOR_HOST for GCS."""

_DESCRIPTION = """Inspect, verify, copy and clean up cloudckpt checkpoints on local disk, S3 and GCS.

examples:
  cloudckpt ls s3://bucket/run                       what is there, which one is latest
  cloudckpt inspect s3://bucket/run/ckpt-7           keys, dtypes, shapes, sizes, scalars
  cloudckpt verify s3://bucket/run --latest          is the latest checkpoint intact?
  cloudckpt cp gs://bucket/run s3://other/run        copy a managed directory between clouds
  cloudckpt cp s3://bucket/run/ckpt-7 ./local/       download one checkpoint
  cloudckpt gc s3://bucket/run --min-age 1d          list what crashed saves left (add --yes to delete)
  cloudckpt rm s3://bucket/run/ckpt-3                delete one checkpoint (shared data stays)
  cloudckpt export s3://bucket/run/ckpt-7 out.npz    the arrays as a plain .npz (or .safetensors)

run 'cloudckpt COMMAND --help' for each command's options and examples."""


def _common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("common options")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bar (also off when stderr is not a terminal)")
    group.add_argument("-v", "--verbose", action="count", default=0, help="log what the library does (-vv: debug)")
    group.add_argument("--traceback", action="store_true",
                       help="print the full traceback of an error (for bug reports)")
    return parent


def _subcommand(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str, module: str,
                summary: str, examples: str, parent: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, parents=[parent], help=summary, description=f"{summary}\n\nexamples:\n{examples}",
        epilog=f"{EXIT_CODES_HELP}\n\n{_URLS_HELP}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(module=module)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (kept apart from ``main`` so tests and docs can render it)."""
    parent = _common_options()
    parser = argparse.ArgumentParser(
        prog="cloudckpt", description=_DESCRIPTION, epilog=f"{EXIT_CODES_HELP}\n\n{_URLS_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from cloudckpt import __version__

    parser.add_argument("--version", action="version", version=f"cloudckpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _subcommand(sub, "ls", "ls", "list the checkpoints in a directory", """\
  cloudckpt ls s3://bucket/run
  cloudckpt ls ./checkpoints --json | jq -r .latest
  cloudckpt ls s3://bucket/run --local-tier /mnt/local-ssd/ckpt   which steps are in which tier""", parent)
    p.add_argument("url", metavar="URL", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--local-tier", metavar="PATH", help="also list this host's local tier directory "
                   "(CheckpointManager(local_tier=...)) and which of its steps the bucket has too")

    p = _subcommand(sub, "inspect", "inspect", "show a checkpoint's keys, dtypes, shapes, sizes and scalar values",
                    """\
  cloudckpt inspect s3://bucket/run/ckpt-7
  cloudckpt inspect gs://bucket/run/ckpt-7 --json""", parent)
    p.add_argument("url", metavar="URL", help="checkpoint path, e.g. s3://bucket/run/ckpt-7")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-values", action="store_true", help="do not fetch the values of 0-d arrays")
    p.add_argument("--chunks", action="store_true", help="list every chunk (shard) of sharded arrays")

    p = _subcommand(sub, "verify", "verify",
                    "re-read a checkpoint (or every one in a directory) and check every CRC32C", """\
  cloudckpt verify s3://bucket/run/ckpt-7
  cloudckpt verify s3://bucket/run            every committed checkpoint
  cloudckpt verify s3://bucket/run --latest   only the one a resume would pick""", parent)
    p.add_argument("url", metavar="URL", help="checkpoint path or directory")
    p.add_argument("--latest", action="store_true", help="with a directory: only the latest checkpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _subcommand(sub, "cp", "copy", "copy a checkpoint or a managed directory between any two stores", """\
  cloudckpt cp gs://bucket/run s3://other/run             every checkpoint, then the state file
  cloudckpt cp s3://bucket/run/ckpt-7 ./laptop/           into a directory (trailing '/')
  cloudckpt cp s3://bucket/run/ckpt-7 gs://b/run/ckpt-7   to an explicit checkpoint path

Data objects are copied first (streamed in parts, their CRC32Cs checked as the bytes pass),
then re-read at the destination and verified, then the index is written last with
create-if-absent: an interrupted copy is never seen as a checkpoint. A directory copy writes
the state file after every checkpoint.""", parent)
    p.add_argument("src", metavar="SRC", help="checkpoint path or checkpoint directory")
    p.add_argument("dst", metavar="DST",
                   help="destination: a directory for a directory; for a checkpoint, its new path, or a "
                        "directory to copy it into when DST ends in '/' or is an existing local directory")
    p.add_argument("--force", action="store_true", help="replace existing destination checkpoints and state file")
    p.add_argument("--no-reread", action="store_true",
                   help="skip re-reading the destination before the commit (the source bytes are still checked)")
    p.add_argument("--part-size", type=parse_size, default=None, metavar="SIZE",
                   help="stream objects in parts of SIZE (default: the destination's part size, 32MiB)")

    p = _subcommand(sub, "gc", "gc", "list (and with --yes delete) what crashed saves left behind", """\
  cloudckpt gc s3://bucket/run                 dry run: what would be deleted
  cloudckpt gc s3://bucket/run --yes           delete it
  cloudckpt gc gs://bucket/run --min-age 6h --yes

Removes data objects no index names, temporary upload chunks and stale S3 multipart uploads,
older than --min-age by the store's clock. Never touches an index, anything an index names,
the state file, or sub-directories. --min-age must exceed your longest save.""", parent)
    p.add_argument("url", metavar="URL", help="checkpoint directory")
    p.add_argument("--min-age", type=parse_duration, default=parse_duration("1d"), metavar="AGE",
                   help="only what is older than AGE (e.g. 0s, 30m, 6h, 2d; default 1d)")
    p.add_argument("--yes", action="store_true", help="really delete (default: dry run)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _subcommand(sub, "rm", "rm", "delete one checkpoint and take it out of the directory's state file", """\
  cloudckpt rm s3://bucket/run/ckpt-7

What a manager's eviction does, by hand: the state file is updated by compare-and-swap (the
latest becomes the newest one left), the index is deleted first, then the data objects no other
committed checkpoint names - an incremental checkpoint's shared bytes stay. A manager saving
into the directory meanwhile stops at its next save (its state file changed).""", parent)
    p.add_argument("url", metavar="URL", help="checkpoint path, e.g. s3://bucket/run/ckpt-7")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _subcommand(sub, "export", "export", "write a checkpoint's arrays as a plain .npz or .safetensors file",
                    """\
  cloudckpt export s3://bucket/run/ckpt-7 model.npz
  cloudckpt export s3://bucket/run/ckpt-7 model.safetensors model/
  cloudckpt export --format safetensors --prefix model/ --strip-prefix s3://bucket/run/ckpt-7 hf-model/

Keys are the checkpoint's key paths, as 'cloudckpt inspect' shows them (model/layers/0/kernel).
A KEY selects every key path equal to it or continuing it with '/' or '.': model/head selects
model/head.weight (PyTorch names) and model/head/bias, not model/header; a KEY ending in '/'
or '.' is a plain prefix. A KEY that selects nothing is an error (exit 3), nothing is written.
In .npz, dtypes numpy cannot name (bfloat16, float8, int4, ...) are widened losslessly to
float32 / int8 / uint8; scalar values become 0-d arrays. .safetensors keeps bfloat16 and
float8 and holds arrays only: what it cannot store is skipped, in one warning line.""", parent)
    p.add_argument("url", metavar="URL", help="checkpoint path")
    p.add_argument("out", metavar="OUT", help="output file: *.npz or *.safetensors")
    p.add_argument("keys", metavar="KEY", nargs="*",
                   help="only the key paths these select (see above; default: all)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--format", choices=("safetensors", "torch-dcp"), default=None,
                   help="safetensors: OUT is a directory that gets Hugging Face sharded safetensors "
                        "(model-0000k-of-0000N.safetensors + model.safetensors.index.json) that "
                        "from_pretrained loads; names are key paths joined with '.'. torch-dcp: OUT is a "
                        "directory in torch DCP's FileSystemWriter layout (FileSystemReader, dcp_to_torch_save)")
    p.add_argument("--prefix", default="", help="with --format safetensors: only the key paths under this "
                   "prefix, e.g. model/ (a Lightning checkpoint: lightning/state_dict/)")
    p.add_argument("--strip-prefix", action="store_true", help="drop --prefix from the names written")
    p.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                   help="with --format safetensors: the largest shard, e.g. 5GiB (default: 5 GB, as transformers)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see ``cloudckpt --help``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    setup_logging(args.verbose)
    module = importlib.import_module(f"cloudckpt.cli.{args.module}")
    return run_command(module.run, args)

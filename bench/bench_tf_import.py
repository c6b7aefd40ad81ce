"""TensorFlow-checkpoint import benchmark: cloudckpt's TensorBundle reader against TensorFlow's own.

Needs TensorFlow, which is never a cloudckpt dependency: ``./run bench tfimport`` builds a
virtual environment of its own for it (``.venv-bench-tf``). One run:

1. writes a TensorFlow checkpoint with ``tf.train.Checkpoint`` (the model + Adam-shaped state
   of ``bench_checkpoint.make_state``, ``--size-mib`` in total, a few hundred float32
   variables) to local disk, and uploads it to SeaweedFS on 127.0.0.1;
2. reads every tensor into numpy, each path ``--repeat`` times (interleaved; the best counts):

   - local disk: ``tf.train.load_checkpoint(p).get_tensor(k)`` for every key; cloudckpt's
     ``load_checkpoint(p).get_tensor(k)`` for every key; and cloudckpt reading them all in
     one call (``tfbundle`` ``Bundle.read``: parallel ranged reads, coalesced small ones);
   - S3: TensorFlow cannot open ``s3://`` itself (that lived in tensorflow-io), so its path is
     the workaround users script - download the objects with boto3, then
     ``tf.train.load_checkpoint`` - against cloudckpt's per-key and all-at-once reads of the
     ``s3://`` URL.

Every read is checked against TensorFlow's values (untimed, once per path). Local reads hit
the page cache for every path alike (the checkpoint was just written). Ratios are against the
best TensorFlow path.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_checkpoint import describe_run, make_state, s3_server, use_bench_credentials
from bench.bench_storage import REPO, MiB, Result


def write_tf_checkpoint(size_mib: int, directory: Path) -> tuple[str, int]:
    """``(prefix, bytes of tensor data)`` of a fresh TensorFlow checkpoint of ``make_state``."""
    import tensorflow as tf

    state = make_state(size_mib * MiB)
    nbytes = sum(int(a.nbytes) for a in state.values())
    variables = {name: tf.Variable(array) for name, array in state.items()}
    del state
    prefix = tf.train.Checkpoint(state=variables).write(str(directory / "ckpt"))
    del variables
    gc.collect()
    return prefix, nbytes


def read_tf(prefix: str) -> dict[str, Any]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()}


def read_ours_per_key(path: str) -> dict[str, Any]:
    import cloudckpt

    reader = cloudckpt.load_checkpoint(path)
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()}


def read_ours_at_once(path: str) -> dict[str, Any]:
    from cloudckpt.storage import resolve
    from cloudckpt.tfbundle import Bundle, load_any_index

    location = resolve(path)
    storage, name = location.storage, location.name
    bundle = load_any_index(storage, name)
    assert isinstance(bundle, Bundle)
    return bundle.read(list(bundle.names))


def check(values: Mapping[str, Any], reference: Mapping[str, np.ndarray], key_of: Mapping[str, str],
          label: str) -> None:
    """Every value equal to TensorFlow's (by raw key), or the run fails."""
    values = {k: v for k, v in values.items() if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}
    assert len(values) == len(reference), (label, len(values), len(reference))
    for name, value in values.items():
        want = reference[key_of.get(name, name)]
        if not np.array_equal(np.asarray(value), np.asarray(want)):
            raise AssertionError(f"{label}: {name} differs from TensorFlow's value")


def measure(paths: list[tuple[str, str, bool, Callable[[], Mapping[str, Any]]]], size: int, repeat: int,
            reference: Mapping[str, np.ndarray], key_of: Mapping[str, str]) -> list[Result]:
    best = {label: float("inf") for _, label, _, _ in paths}
    for run in range(repeat):
        for _, label, _, fn in paths:
            gc.collect()
            started = time.perf_counter()
            values = fn()
            elapsed = time.perf_counter() - started
            best[label] = min(best[label], elapsed)
            if run == 0:
                check(values, reference, key_of, label)
            del values
    return [Result(target, "read", label, best[label], size, ours) for target, label, ours, _ in paths]


def s3_download_then_tf(client: Any, bucket: str, prefix: str, objects: list[str], workdir: Path) -> Callable[
        [], Mapping[str, Any]]:
    def run() -> Mapping[str, Any]:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        for name in objects:
            client.download_file(bucket, f"{prefix}/{name}", str(workdir / name))
        return read_tf(str(workdir / "ckpt"))
    return run


def report(timings: list[Result]) -> None:
    print()
    print(f"{'target':6}  {'path':58}  {'MiB/s':>8}  {'vs best TF':>10}")
    for target in dict.fromkeys(t.target for t in timings):
        rows = [t for t in timings if t.target == target]
        peers = [t.mib_s for t in rows if not t.ours]
        for t in rows:
            ratio = f"{t.mib_s / max(peers):.2f}x" if peers else "-"
            print(f"{t.target:6}  {t.path:58}  {t.mib_s:8.1f}  {ratio:>10}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench tfimport", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="checkpoint size (default 1024 = 1 GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per path; the best counts (default 3)")
    parser.add_argument("--backends", default="local,s3", help="comma-separated: local, s3")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 MiB, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.repeat = 32, 1
    backends = [b for b in args.backends.split(",") if b]
    if set(backends) - {"local", "s3"}:
        parser.error(f"unknown backends {sorted(set(backends) - {'local', 's3'})}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    try:
        import tensorflow as tf
    except ImportError:
        print("this benchmark needs TensorFlow: run it as `./run bench tfimport`", file=sys.stderr)
        return 2
    use_bench_credentials()
    print(f"{describe_run()}; TensorFlow {tf.__version__}", flush=True)
    timings: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="cloudckpt-bench-tf-", dir=REPO) as tmp:
        root = Path(tmp)
        print(f"writing a {args.size_mib} MiB TensorFlow checkpoint ...", flush=True)
        prefix, size = write_tf_checkpoint(args.size_mib, root / "local")
        reference = read_tf(prefix)
        from cloudckpt.storage import resolve
        from cloudckpt.tfbundle import Bundle, load_any_index

        bundle = load_any_index(resolve(prefix).storage, resolve(prefix).name)
        assert isinstance(bundle, Bundle)
        key_of = dict(bundle.names)
        objects = sorted(p.name for p in (root / "local").iterdir() if p.name.startswith("ckpt."))
        print(f"  {len(reference) - 1} tensors + the object graph, {size / MiB:.1f} MiB in {objects}", flush=True)
        reference.pop("_CHECKPOINTABLE_OBJECT_GRAPH", None)
        if "local" in backends:
            print("local disk ...", flush=True)
            timings += measure([
                ("local", "tf.train.load_checkpoint + get_tensor (every key)", False, lambda: read_tf(prefix)),
                ("local", "cloudckpt load_checkpoint + get_tensor (every key)", True,
                 lambda: read_ours_per_key(prefix)),
                ("local", "cloudckpt tfbundle Bundle.read (all keys at once)", True,
                 lambda: read_ours_at_once(prefix)),
            ], size, args.repeat, reference, key_of)
        if "s3" in backends:
            import boto3
            from botocore.config import Config

            from cloudckpt.storage import open_storage

            with s3_server(root) as endpoint:
                print(f"SeaweedFS at {endpoint} ...", flush=True)
                os.environ["AWS_ENDPOINT_URL"] = endpoint
                client = boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))
                bucket = f"bench-{uuid.uuid4().hex[:10]}"
                client.create_bucket(Bucket=bucket)
                store = open_storage(f"s3://{bucket}/tf")
                for name in objects:
                    store.put(name, (root / "local" / name).read_bytes())
                url = f"s3://{bucket}/tf/ckpt"
                timings += measure([
                    ("s3", "boto3 download_file each object + tf.train.load_checkpoint", False,
                     s3_download_then_tf(client, bucket, "tf", objects, root / "download")),
                    ("s3", "cloudckpt load_checkpoint(s3://) + get_tensor (every key)", True,
                     lambda: read_ours_per_key(url)),
                    ("s3", "cloudckpt tfbundle Bundle.read (all keys at once)", True, lambda: read_ours_at_once(url)),
                ], size, args.repeat, reference, key_of)
    report(timings)
    print(f"{describe_run()} (at the end)")
    return 0

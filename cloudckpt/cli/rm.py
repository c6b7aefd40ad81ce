"""``cloudckpt rm URL/ckpt-N``: delete one checkpoint and take it out of the directory's state file.

All of it is ``cloudckpt.remove_checkpoint`` (in ``cloudckpt.tools`` too; the manager's
eviction, by hand): the state file is updated by compare-and-swap, the index goes first, and
data objects that other committed checkpoints still name (incremental saves) are kept. This
module only reports.
"""

from __future__ import annotations

from typing import Any

from cloudckpt.cli.common import EXIT_OK, human_size, print_json
from cloudckpt.tools import remove_checkpoint


def run(args: Any) -> int:
    removal = remove_checkpoint(args.url)
    if args.json:
        print_json({"removed": removal.url, "deleted": list(removal.deleted), "kept": list(removal.kept),
                    "state_updated": removal.state_updated, "latest": removal.latest})
        return EXIT_OK
    kept = ""
    if removal.kept:
        kept = (f"; kept {len(removal.kept)} ({human_size(removal.kept_bytes)}) named by other checkpoints "
                f"(incremental saves)")
    state = (f"; the state file's latest is now {removal.latest or 'none'}" if removal.state_updated
             else "; no state file listed it")
    print(f"removed {removal.url}: its index and {len(removal.deleted)} data object(s){kept}{state}")
    return EXIT_OK

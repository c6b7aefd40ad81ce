"""What one host's local tier directory holds, step by step: the library side of ``cloudckpt ls --local-tier``.

Read-only. A step is ``committed`` when this host's manifest commits it (every host and its
replicas had it), ``partial`` when only objects are here (a save killed before the manifests,
or a step fenced mid-save): no resume uses a partial step.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

from cloudckpt.format import INDEX_SUFFIX
from cloudckpt.format.naming import object_checkpoint
from cloudckpt.manager.tiers.holdings import MANIFEST_DIR, Holdings, HostDirectory, step_of


@dataclass(frozen=True, slots=True)
class LocalStep:
    """One step in a host's local tier directory.

    Attributes:
        name: the checkpoint name (``ckpt-7``).
        number: its step number.
        status: ``committed`` (this host's manifest commits it) or ``partial``.
        objects: objects held here (index and data objects - this host's own and its peers' replicas).
        size: their bytes.
        hosts: how many hosts' data objects the manifest records for the step (0 when partial).
    """

    name: str
    number: int
    status: str
    objects: int
    size: int
    hosts: int


def list_local_tier(path: str | os.PathLike[str]) -> list[LocalStep]:
    """The steps in the local tier directory ``path``, oldest first."""
    holdings = Holdings(HostDirectory(path))
    manifests = {m.name: m for m in holdings.manifests()}
    sizes: dict[str, list[int]] = defaultdict(list)
    for meta in holdings.storage.list(""):
        if meta.key.startswith(MANIFEST_DIR):
            continue
        name = meta.key[:-len(INDEX_SUFFIX)] if meta.key.endswith(INDEX_SUFFIX) else object_checkpoint(meta.key)
        if name is not None:
            sizes[name].append(meta.size)
    steps = []
    for name in sorted(set(sizes) | set(manifests), key=step_of):
        manifest = manifests.get(name)
        steps.append(LocalStep(name, step_of(name), "committed" if manifest else "partial", len(sizes[name]),
                               sum(sizes[name]), len(set(manifest.owners.values())) if manifest else 0))
    return steps

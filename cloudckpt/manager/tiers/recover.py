"""Resume from the local tier: agree on the newest step complete somewhere, fetch what is missing.

Every host reports the steps its manifests commit (only those of this incarnation's lineage,
``Holdings.acceptable``); newest first, the hosts then check one candidate at a time:

1. one host holding the committed index (its CRC32C matches the manifest) shares it;
2. every host CRC32C-verifies the candidate's data objects it holds, all-gathered;
3. complete iff every data object the index names is verified on some host - a flipped
   byte makes a copy not count, so the other copy (or an older step) is used, never it;
4. each host receives the objects it lacks (first: those it wrote and those holding whole
   arrays; after a restore that needed more: all it lacks) from the lowest rank holding them
   verified, and the index.

The caller restores from the local directory only then; the decisions are logged with why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from cloudckpt.coordination import Coordinator
from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format import ArrayEntry, index_key
from cloudckpt.manager.tiers.holdings import Holdings, Manifest, step_of
from cloudckpt.manager.tiers.replicate import Item, move

log = logging.getLogger("cloudckpt.manager.tiers")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A local step complete across the hosts: where each data object is held verified."""

    name: str
    owners: dict[str, int]
    #: key -> size, every data object the index names
    sizes: dict[str, int]
    #: key -> ranks holding it verified
    verified: dict[str, list[int]]
    #: the committing manifest (a host that lacked it writes it once the step is restored)
    manifest: Manifest
    #: objects holding whole arrays, which every host restores: key -> those chunks' (offset, length)
    whole: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)


def candidates(holdings: Holdings, coordinator: Coordinator, token: str | None,
               at_least: int) -> Iterator[Candidate]:
    """Complete local steps numbered ``>= at_least``, newest first (collective, lazily, one step at a time)."""
    mine = {m.name: m.owners for m in holdings.manifests() if holdings.acceptable(m, token)}
    reports: list[dict[str, dict[str, int]]] = coordinator.all_gather_object(mine)
    names = sorted({n for r in reports for n in r if step_of(n) >= at_least}, key=step_of, reverse=True)
    for name in names:
        owners = next(r[name] for r in reports if name in r)
        manifest = holdings.manifest(name)
        local_text = holdings.index_text(name, manifest) if manifest is not None else None
        holders = coordinator.all_gather_object(local_text is not None)
        if not any(holders):
            log.warning("local tier: %s has no intact index on any host; trying an older step", name)
            continue
        shared = (local_text, manifest.to_bytes().decode()) if local_text is not None and manifest else None
        text, committed = coordinator.broadcast_object(shared, src=holders.index(True))
        try:
            index = holdings.decode(name, text)
        except CheckpointFormatError as exc:  # identical on every rank: every rank skips it
            log.warning("local tier: the index of %s does not validate (%s); trying an older step", name, exc)
            continue
        sizes = {obj.name: obj.size for obj in index.objects}
        # Objects holding a whole array (an unsharded leaf - a step counter, a replicated array written
        # as one chunk): every host restores those in full, so every host needs them.
        whole: dict[str, list[tuple[int, int]]] = {}
        for entry in index.entries.values():
            if isinstance(entry, ArrayEntry):
                for c in entry.chunks:
                    if tuple(c.shape) == tuple(entry.shape):
                        whole.setdefault(index.objects[c.object].name, []).append((c.offset, c.length))
        verified: dict[str, list[int]] = {}
        held = holdings.verified(index, holdings.data_objects(name))
        for rank, keys in enumerate(coordinator.all_gather_object(held)):
            for key in keys:
                verified.setdefault(key, []).append(rank)
        missing = sorted(k for k in sizes if k not in verified)
        if missing:
            log.warning("local tier: %s is incomplete - %d data object(s) on no host verified (%s%s); trying an "
                        "older step", name, len(missing), ", ".join(missing[:3]), " ..." if len(missing) > 3 else "")
            continue
        if local_text is None:  # a replaced host (or a damaged copy): the shared, validated index
            holdings.storage.put(index_key(name), text.encode())
        yield Candidate(name, owners, sizes, verified, Manifest.parse(committed.encode(), name),
                        {k: tuple(sorted(v)) for k, v in whole.items()})


def fetch(holdings: Holdings, coordinator: Coordinator, candidate: Candidate, *, everything: bool = False) -> int:
    """Bring each host the objects it lacks from a verified holder; the bytes this host received.

    A host gets the objects it wrote, and of other hosts' objects the chunks of whole arrays (kept
    as pieces: ``HostDirectory.put_pieces``); with ``everything`` (this host's restore needed more -
    a replicated piece another host wrote), every object it lacks, whole. Collective: every
    rank passes its own ``everything``.
    """
    wants_all = coordinator.all_gather_object(everything)
    routes: dict[int, dict[int, list[Item]]] = {}
    for key, ranks in sorted(candidate.verified.items()):
        owner = candidate.owners.get(key, -1)
        for dst in range(coordinator.world_size):
            if dst in ranks or not (wants_all[dst] or dst == owner or key in candidate.whole):
                continue
            # A host that needs only the whole arrays in another host's object gets only their bytes.
            ranges = () if wants_all[dst] or dst == owner else candidate.whole[key]
            routes.setdefault(dst, {}).setdefault(ranks[0], []).append((key, candidate.sizes[key], ranges))
    received = move(holdings, coordinator, routes)
    if routes:
        log.info("local tier: %s - rank %d received %d bytes from its peers (%d object(s) moved in all)",
                 candidate.name, coordinator.rank, received, sum(len(v) for r in routes.values() for v in r.values()))
    return received

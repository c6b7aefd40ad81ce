"""``LocalTier``: where a host keeps its fast copies, how many peers hold a replica, how many steps stay.

A value object the user hands to ``CheckpointManager(local_tier=...)``; it opens nothing
until the manager does. Replica placement is a pure function of every host's failure
domain (``replica_holders``), so every rank computes the same answer from one all-gather.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LocalTier:
    """The host-local tier of a ``CheckpointManager``.

    Args:
        path: a directory on this host (tmpfs, local NVMe); every host passes its own.
        replicas: how many peer hosts also keep each of this host's shards (0: none).
        max_to_keep: how many local steps each host keeps (its own retention, apart from the bucket's).
        failure_domain: what a host and its replica holders must not share (a rack, a VM);
            ``None`` is the hostname. On one machine, pass something distinct per process
            (the rank) - otherwise every peer shares the domain and replicas go to peers anyway,
            with a warning.
        every_n_steps: the automatic policy's local interval - ``manager.save()`` without ``tier=``
            saves step ``s`` locally when ``s % every_n_steps == 0`` (``None``: no automatic local saves).
        bucket_every_n_steps: the automatic policy's bucket interval - step ``s`` goes to the bucket
            when ``s % bucket_every_n_steps == 0`` (it wins over a local save of the same step).
            With neither set, ``save()`` goes to the bucket as without a local tier. The step is
            ``save(checkpoint_number=...)``, else the manager's ``step_counter``, else the count of
            ``save()`` calls of this manager. A step neither interval names is skipped (``None``).
    """

    path: str | os.PathLike[str]
    replicas: int = 1
    max_to_keep: int = 2
    failure_domain: str | None = None
    every_n_steps: int | None = None
    bucket_every_n_steps: int | None = None

    def __post_init__(self) -> None:
        if not os.fspath(self.path):
            raise ValueError("LocalTier path must be a non-empty directory path")
        if not isinstance(self.replicas, int) or self.replicas < 0:
            raise ValueError(f"LocalTier replicas must be a non-negative int, got {self.replicas!r}")
        if not isinstance(self.max_to_keep, int) or self.max_to_keep <= 0:
            raise ValueError(f"LocalTier max_to_keep must be a positive int, got {self.max_to_keep!r}")
        for field in ("every_n_steps", "bucket_every_n_steps"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"LocalTier {field} must be a positive int or None, got {value!r}")

    @property
    def automatic(self) -> bool:
        """Whether ``manager.save()`` without ``tier=`` follows this tier's intervals."""
        return self.every_n_steps is not None or self.bucket_every_n_steps is not None

    def tier_for(self, step: int) -> str | None:
        """The automatic policy: ``"bucket"``, ``"local"`` or ``None`` (skip) for ``step``.

        A pure function of the step, so every host of a job decides the same without a
        collective (a skipped save never waits on an async save in flight).
        """
        if self.bucket_every_n_steps is not None and step % self.bucket_every_n_steps == 0:
            return "bucket"
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            return "local"
        return None if self.automatic else "bucket"

    def domain(self) -> str:
        """This host's failure domain (the hostname unless given)."""
        return self.failure_domain if self.failure_domain is not None else socket.gethostname()


def replica_holders(domains: list[str], replicas: int) -> list[list[int]]:
    """For each rank, the ranks that keep a replica of its shards.

    Hosts of *other* failure domains first, taken round-robin from the next domain on, so that
    holders spread over domains and each host holds about ``replicas`` others' shards; peers
    in the same domain only when other domains run out. Deterministic: every rank computes
    the same table from the same gathered domains.
    """
    world = len(domains)
    order = sorted(set(domains))
    table: list[list[int]] = []
    for rank in range(world):
        mine = order.index(domains[rank])
        # Other domains in ring order from the next one, each domain's ranks rotated by our position
        # in our own domain, so two hosts of one domain pick different holders.
        position = [r for r in range(world) if domains[r] == domains[rank]].index(rank)
        others: list[int] = []
        for step in range(1, len(order)):
            members = [r for r in range(world) if domains[r] == order[(mine + step) % len(order)]]
            others.append(members[position % len(members)])
        for step in range(1, len(order)):  # then the remaining members of other domains
            members = [r for r in range(world) if domains[r] == order[(mine + step) % len(order)]]
            others.extend(r for r in members if r not in others)
        same = [r for r in range(world) if domains[r] == domains[rank] and r != rank]
        table.append([*others, *same][:replicas])
    return table

"""What one save derives from its ``CheckpointOptions`` and its coordinator, computed once."""

from __future__ import annotations

from dataclasses import dataclass

from cloudckpt.coordination import Coordinator, io_rank
from cloudckpt.options import CheckpointOptions


@dataclass(frozen=True, slots=True)
class SaveSettings:
    """The decisions a save's options imply on this host.

    Attributes:
        options: the options themselves (their write callbacks run after the commit).
        io_rank: the only rank touching storage (``experimental_io_device``), or ``None``.
        committer: the rank that commits the index and runs the bookkeeping after it.
        asynchronous: upload in the background after a snapshot.
        staging_budget: bytes the async snapshot may occupy.
    """

    options: CheckpointOptions
    io_rank: int | None
    committer: int
    asynchronous: bool
    staging_budget: int

    @classmethod
    def of(cls, options: CheckpointOptions | None, coordinator: Coordinator) -> SaveSettings:
        """The settings of a save with ``options`` on ``coordinator``'s job.

        Raises:
            ValueError: ``experimental_io_device`` names no rank of this job.
        """
        options = options or CheckpointOptions()
        target = io_rank(options, coordinator)
        return cls(options=options, io_rank=target, committer=0 if target is None else target,
                   asynchronous=options.enable_async, staging_budget=options.async_staging_budget)

    @property
    def routed(self) -> bool:
        """Whether one io host does all the storage I/O of the save."""
        return self.io_rank is not None

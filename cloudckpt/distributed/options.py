"""What ``CheckpointOptions.experimental_io_device`` means in a multi-host job.

TensorFlow device syntax names the host that does all storage I/O:
``/job:worker/replica:0/task:K`` (any job name) is rank ``K`` of the checkpoint's
coordinator; ``/job:localhost`` (or no task) means "this process" - every host does its
own I/O, the default. In a single-process job every value is a no-op.
"""

from __future__ import annotations

from cloudckpt.distributed.coordinator import Coordinator
from cloudckpt.options import CheckpointOptions


def io_rank(options: CheckpointOptions, coordinator: Coordinator) -> int | None:
    """The rank that alone touches storage, or ``None`` (every rank writes its own shards).

    Raises:
        ValueError: ``experimental_io_device`` names a task outside the job, or a replica
            other than 0 (naming the option).
    """
    spec = options.io_device_spec
    if spec is None or coordinator.world_size == 1:
        return None
    if spec.job == "localhost" or spec.task is None:
        return None
    if spec.replica not in (None, 0):
        raise ValueError(f"experimental_io_device {options.experimental_io_device!r}: only replica 0 exists in a "
                         f"torch.distributed job")
    if not 0 <= spec.task < coordinator.world_size:
        raise ValueError(f"experimental_io_device {options.experimental_io_device!r}: task {spec.task} is not a rank "
                         f"of this job of {coordinator.world_size} processes")
    return spec.task

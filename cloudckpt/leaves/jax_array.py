"""``jax.Array``: saved shard by shard from its addressable shards, restored as a *new* array.

Why a kind of its own and not a ``ShardedValue`` view: a ``jax.Array`` is immutable, so a
restore cannot read into it. It reads each addressable box of the *target* sharding (the
``like`` array's, or a ``jax.ShapeDtypeStruct``'s) into a host buffer of that box alone,
puts each buffer on the devices that hold the box, and assembles the new array with
``jax.make_array_from_single_device_arrays`` - the global array never exists on a host -
then replaces the old value through the container's setter.

Saving: a single-device array is an ordinary array entry (its host view; on CPU a zero-copy
view of the device buffer). A sharded one is a ``ShardedLeaf`` of the addressable shards
whose ``replica_id`` is 0, so every replicated box is written exactly once in the job, by
the process holding its first replica; the save plan checks that the boxes of all
processes tile the global shape. On CPU both are marked ``frozen``: the buffer is immutable and
the view keeps it alive, so an async save uploads from it without a staging copy, as Orbax
does (while the view is held, jax does not donate that buffer to a jitted step, which then
allocates anew). Entries carry the ``ndarray`` pytype: without a ``like``,
readers (``load_variable``, ``cloudckpt export``) get numpy arrays.

jax is never imported here: this kind claims only values whose type comes from jax, and
then jax is in ``sys.modules`` already. Typed PRNG keys are refused here (``cloudckpt.jax``
stores them as their key data and impl name).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.format import storage_dtype
from cloudckpt.leaves.base import (
    ArrayLeaf,
    LeafKind,
    LeafPlan,
    Setter,
    ShardedLeaf,
    array_entry,
    check_array,
    display_path,
    host_array,
    refuse,
)
from cloudckpt.leaves.copier import Copier, CopierChoice, DeviceArray, HostBytes, Pending, ThreadCopier

Box = tuple[tuple[int, ...], tuple[int, ...]]


def _jax() -> Any:
    """The jax module, already imported by whoever made the value (never imported here)."""
    return sys.modules["jax"]


def is_jax_value(value: object) -> bool:
    """A ``jax.Array`` or ``jax.ShapeDtypeStruct`` (a restore target); cheap for anything else."""
    if not type(value).__module__.startswith(("jax", "jaxlib")) or "jax" not in sys.modules:
        return False
    jax = _jax()
    return isinstance(value, (jax.Array, jax.ShapeDtypeStruct))


def is_prng_key(value: Any) -> bool:
    """A typed PRNG key array (``jax.random.key``), or a ``ShapeDtypeStruct`` of one."""
    jax = _jax()
    return bool(jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key))


def box_of(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    """``(start, extent)`` of a shard's index (slices into the global shape)."""
    starts, extents = [], []
    for sl, dim in zip(index, shape, strict=True):
        lo, hi, _ = sl.indices(dim)
        starts.append(lo)
        extents.append(max(hi - lo, 0))
    return tuple(starts), tuple(extents)


def written_shards(value: Any) -> list[Any]:
    """The addressable shards of ``value`` this process writes: replica 0 of each box."""
    return [shard for shard in value.addressable_shards if shard.replica_id == 0]


class JaxDeviceArray(DeviceArray):
    """One device's ``jax.Array`` (an unsharded array, or a shard's data) read through a copier.

    Why: on an accelerator ``np.asarray`` at collect time copied every array to host memory
    and staging then copied it again, the whole state held twice on the host. Handed over
    as a ``DeviceArray``, the array is read only when the copier's batch runs, straight into
    the staging area or a sync save's ring slot. Never restored into (a ``jax.Array`` is
    immutable: a restore builds new arrays with ``device_put``).
    """

    def __init__(self, value: Any, copier: Copier) -> None:
        super().__init__(tuple(int(n) for n in value.shape), storage_dtype(np.dtype(value.dtype)), copier)
        self.value = value

    def copy_to_host(self, dest: HostBytes) -> None:
        if self.nbytes:  # jax's transfer (started by the batch) lands in its own host buffer, freed after this
            self.host_view(dest)[...] = np.asarray(self.value)

    def copy_from_host(self, src: HostBytes, rows: tuple[int, int]) -> None:
        raise TypeError("a jax.Array is immutable: a restore builds a new one (device_put), never copies into it")


class JaxCopier(ThreadCopier):
    """Starts every device-to-host transfer of a batch at once (``copy_to_host_async``), then reads
    them one by one into the host buffers on the copier's thread: one batch, the transfers side by side."""

    name = "jax"

    def to_host(self, batch: Sequence[tuple[DeviceArray, HostBytes]]) -> Pending:
        for array, _ in batch:
            if isinstance(array, JaxDeviceArray):
                array.value.copy_to_host_async()
        return super().to_host(batch)


_selection = CopierChoice(JaxCopier)


def copier_for(value: Any) -> Copier | None:
    """The copier that reads ``value`` (one device's array), or ``None`` on CPU, where its host view
    is the device memory itself (zero copy: nothing to gain from a copier)."""
    on_cpu = all(device.platform == "cpu" for device in value.sharding.device_set)
    return _selection.current() if _selection.routes_host() or not on_cpu else None


def use_copier(copier: Copier, *, cpu_arrays: bool = False) -> AbstractContextManager[Copier]:
    """Read device arrays through ``copier`` within the block; ``cpu_arrays``: CPU ones too.

    The seam CI runs the accelerator path through (an instrumented copier, CPU arrays
    standing in for device ones), as ``cloudckpt.adapters.torch_device.use_copier`` is for torch.
    """
    return _selection.use(copier, host_too=cpu_arrays)


def _bytes_of(value: Any, path: str) -> NDArray[Any] | DeviceArray:
    """One device's array for a save: its host view on CPU, else a ``JaxDeviceArray`` its copier reads."""
    copier = copier_for(value)
    if copier is None:
        return host_array(np.asarray(value), path)
    return JaxDeviceArray(value, copier)


def start_host_copies(value: Any) -> None:
    """Start the device-to-host copies of the shards a save will read (on an accelerator they then
    run side by side instead of one ``np.asarray`` at a time; on CPU the host view is the device
    memory and nothing is copied). Only replica 0 of each box: a replicated array is copied once.
    An array a copier reads is left to its batch (started then, not held on the host meanwhile)."""
    if copier_for(value) is not None:
        return
    if len(value.sharding.device_set) == 1:
        value.copy_to_host_async()
        return
    for shard in written_shards(value):
        shard.data.copy_to_host_async()


class JaxArrayKind(LeafKind):
    """``jax.Array`` (any sharding; typed PRNG keys excluded) and ``jax.ShapeDtypeStruct`` as a restore target."""

    name = "jax"

    def matches(self, value: object) -> bool:
        return is_jax_value(value)

    def collect(self, value: Any, path: str) -> ArrayLeaf | ShardedLeaf:
        jax = _jax()
        if isinstance(value, jax.ShapeDtypeStruct):
            raise ValueError(f"cannot checkpoint {display_path(path)}: a jax.ShapeDtypeStruct has no values (it "
                             f"only describes a restore target)")
        if is_prng_key(value):
            raise ValueError(f"cannot checkpoint {display_path(path)}: a typed PRNG key array; save it with "
                             f"cloudckpt.jax, which stores its key data and impl")
        shape = tuple(int(n) for n in value.shape)
        if len(value.sharding.device_set) == 1:
            data = _bytes_of(value, path)
            return ArrayLeaf(data, "ndarray", frozen=not isinstance(data, DeviceArray))
        start_host_copies(value)
        shards: list[tuple[tuple[int, ...], NDArray[Any] | DeviceArray]] = []
        for shard in written_shards(value):  # other replicas: another device (maybe another process) writes them
            start, _ = box_of(shard.index, shape)
            shards.append((start, _bytes_of(shard.data, path)))
        frozen = not any(isinstance(data, DeviceArray) for _, data in shards)
        return ShardedLeaf(shape, storage_dtype(np.dtype(value.dtype)), "ndarray", tuple(shards), frozen)

    def restore(self, plan: LeafPlan, live: Any, setter: Setter | None) -> None:
        jax = _jax()
        entry = array_entry(plan, live)
        if is_prng_key(live):
            raise refuse(plan, "a typed PRNG key array is restored by cloudckpt.jax (from its key data and impl)")
        shape = tuple(int(n) for n in live.shape)
        check_array(plan, entry, shape, np.dtype(live.dtype))
        if setter is None:
            raise refuse(plan, "a jax.Array is immutable and this one sits where it cannot be replaced")
        sharding = live.sharding
        if sharding is None:  # a ShapeDtypeStruct without a sharding: jax's default device
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        buffers: dict[Box, NDArray[Any]] = {}
        placed: list[tuple[Any, Box]] = []
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            box = box_of(index, shape) if index is not None else ((0,) * len(shape), shape)
            if box not in buffers:  # replicas on several local devices: read once
                buffers[box] = plan.read_new(box[1], start=box[0])
            placed.append((device, box))
        plan.then(_assemble(jax, shape, sharding, placed, buffers, setter))


def _assemble(jax: Any, shape: tuple[int, ...], sharding: Any, placed: list[tuple[Any, Box]],
              buffers: dict[Box, NDArray[Any]], setter: Setter) -> Callable[[], None]:
    """After the reads: each box onto its devices, then one global array from them."""
    def apply() -> None:
        arrays = [jax.device_put(buffers[box], device) for device, box in placed]
        setter(jax.make_array_from_single_device_arrays(shape, sharding, arrays))
    return apply


JAX_ARRAY = JaxArrayKind()

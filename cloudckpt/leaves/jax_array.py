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
processes tile the global shape. Entries carry the ``ndarray`` pytype: without a ``like``,
readers (``load_variable``, ``cloudckpt export``) get numpy arrays.

jax is never imported here: this kind claims only values whose type comes from jax, and
then jax is in ``sys.modules`` already. Typed PRNG keys are refused here (``cloudckpt.jax``
stores them as their key data and impl name).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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


def start_host_copies(value: Any) -> None:
    """Start the device-to-host copies of the shards a save will read (on an accelerator they then
    run side by side instead of one ``np.asarray`` at a time; on CPU the host view is the device
    memory and nothing is copied). Only replica 0 of each box: a replicated array is copied once."""
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
            return ArrayLeaf(host_array(np.asarray(value), path), "ndarray")
        start_host_copies(value)
        shards: list[tuple[tuple[int, ...], NDArray[Any]]] = []
        for shard in written_shards(value):  # other replicas: another device (maybe another process) writes them
            start, _ = box_of(shard.index, shape)
            shards.append((start, host_array(np.asarray(shard.data), path)))
        return ShardedLeaf(shape, storage_dtype(np.dtype(value.dtype)), "ndarray", tuple(shards))

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

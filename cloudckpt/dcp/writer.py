"""``StorageWriter``: ``torch.distributed.checkpoint.save`` writing an ordinary cloudckpt checkpoint.

DCP drives the save (its planner decides what each rank writes, its process group runs
the planning collectives); this writer decides where the bytes go and when the checkpoint
becomes visible, with the pieces ``Checkpoint.write`` uses. DCP's call order, and what
happens at each step::

    set_up_storage_writer   (all)    per-save state; the rank must match the coordinator's
    prepare_local_plan      (all)    tell the coordinator where this rank writes
    prepare_global_plan     (rank 0) HEAD the index (refuse a committed checkpoint unless
                                     overwrite=True); one write-unique suffix; lay out every
                                     rank's data objects (saving.plan.make_plan: paths
                                     agree, shards cover each tensor exactly once) - sent to
                                     the ranks in each plan's storage_data
    write_data              (all)    upload this rank's objects (CRC32C per chunk and per
                                     1 MiB block), polling the other ranks while it runs;
                                     then every rank learns who failed: on any failure each
                                     rank deletes its own objects, and the failed ranks raise
    finish                  (rank 0) after every rank's results arrived: assemble the index
                                     and commit it through saving.committer.Committer, the
                                     step ``Checkpoint.write`` commits through too (decoded
                                     back as a reader would, create-if-absent /
                                     replace-if-unchanged, the manager's bookkeeping); on a
                                     failed commit, delete every rank's objects

So no index exists unless every rank's bytes are stored, no failed save leaves data
behind (a killed process leaves objects no index names: a manager's next save, or
``cloudckpt gc``, removes them), and a committed checkpoint is never touched by a later
save to the same path unless ``overwrite=True`` - and then replaced in one atomic PUT,
its data objects deleted only after.

Why one ~500-line module: it is one class whose methods DCP calls in the order above, and
reading that protocol top to bottom is the point; what is not the protocol already lives
elsewhere (the plan in ``saving.plan``, the uploads in ``saving.objects``, the commit in
``saving.committer``, device tensors in ``leaves.copier``).

The collectives of ``write_data`` run on the writer's ``Coordinator`` (by default
``cloudckpt.coordination.default_coordinator()``: a gloo group of its own in a multi-process
job), whose ranks must be DCP's: with ``no_dist=True`` in a multi-process job, or a DCP
``process_group`` that is not the whole job, pass ``coordinator=`` accordingly.

Why one module of ~500 lines: it is one class implementing DCP's ``StorageWriter`` protocol,
whose steps share one save's state, plus the small records DCP carries between them; what
is not DCP-specific (plan, upload, polling, the commit step) lives in ``cloudckpt.saving``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter as DCPStorageWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future as TorchFuture

from cloudckpt._testhooks import crash_point
from cloudckpt.adapters import torch as torch_adapter
from cloudckpt.adapters import torch_device
from cloudckpt.coordination import Coordinator, LocalCoordinator, default_coordinator
from cloudckpt.dcp.metadata import encode_dcp_field, fqn_path, numpy_dtype, stored_dtype_name
from cloudckpt.dcp.paths import Addressed, CheckpointId
from cloudckpt.errors import (
    AfterCommitError,
    AlreadyExistsError,
    ConcurrentWriterError,
    CoordinationError,
)
from cloudckpt.format import CheckpointIndex, Chunk, DataObject, NodeEntry
from cloudckpt.object_graph import Collected, ShardedLeaf
from cloudckpt.saving.collective import describe_error, start_polled, wait_for_every_rank
from cloudckpt.saving.commit import assemble_index, number_objects
from cloudckpt.saving.committer import AfterCommit, CommittedWrite, Committer
from cloudckpt.saving.objects import (
    BaseCheckpoint,
    Piece,
    PieceId,
    StoredPiece,
    UploadLog,
    new_suffix,
    plan_objects,
    shared_base,
    spreads,
    upload,
)
from cloudckpt.saving.plan import Description, PieceDescription, make_plan
from cloudckpt.storage import Location, Storage
from cloudckpt.storage.registry import is_registered

#: Deprecated: ``cloudckpt.errors.AfterCommitError`` under the name the DCP writer raised before
#: (one release, then removed); ``except BookkeepingError`` still catches what it caught.
BookkeepingError = AfterCommitError

log = logging.getLogger("cloudckpt.dcp")

#: After another rank is lost, how long this rank's upload in flight may take to end before
#: its objects are removed (what it uploads later stays until a manager's cleanup).
UPLOAD_GRACE = 60.0


@dataclass(frozen=True, slots=True)
class RankInfo:
    """A rank's ``SavePlan.storage_data`` from ``prepare_local_plan``: where it writes, how wide."""

    url: str
    max_objects: int


@dataclass(frozen=True, slots=True)
class RankLayout:
    """A rank's ``SavePlan.storage_data`` from ``prepare_global_plan``: its data objects.

    Attributes:
        suffix: the write-unique suffix the coordinator chose (every rank's objects carry it).
        groups: the pieces of each of this rank's data objects, in order.
        index_offset: the global number of this rank's first object.
        total_objects: N in ``data-0000k-of-0000N``.
    """

    suffix: str
    groups: tuple[tuple[PieceId, ...], ...]
    index_offset: int
    total_objects: int


@dataclass(frozen=True, slots=True)
class StoredItem:
    """A ``WriteResult.storage_data``: where one item's bytes are, and the size of that object.

    The object is one this write uploaded, or - an incremental save - one of the base
    checkpoint's that already holds identical bytes.
    """

    piece: StoredPiece
    object_size: int


@dataclass(frozen=True, slots=True)
class ManagedSave:
    """What ``DCPCheckpoint`` adds to a save: the manager's bookkeeping and the index extras.

    Attributes:
        after_commit: runs on the coordinator right after the commit (state file, retention).
        metadata: user metadata for the index (``CheckpointManager.save(metadata=...)``).
        save_counter: recorded in the index's ``dcp`` field.
        session_held: the caller holds the coordinator's session for the whole save.
        base: a committed checkpoint in the same directory whose identical pieces (same key,
            box, dtype, size and XXH3-128) are referenced instead of uploaded (a manager's
            incremental save); each rank reads its index.
    """

    after_commit: AfterCommit | None = None
    metadata: Mapping[str, Any] | None = None
    save_counter: int | None = None
    session_held: bool = False
    base: str | None = None


def piece_of(item: WriteItem) -> PieceId:
    """The piece a DCP write item is: ``(key path, start in the global tensor)``; byte items at ``(0,)``."""
    if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
        return fqn_path(item.index.fqn), (0,)
    return fqn_path(item.index.fqn), tuple(int(o) for o in item.tensor_data.chunk.offsets)


def _describe(rank_items: Sequence[WriteItem], info: RankInfo, suffix: str) -> Description:
    """One rank's items as the save plan's ``Description`` (byte items as empty uint8 arrays:
    their size is known only once DCP serializes them, and nothing else about them needs checking)."""
    arrays: dict[str, tuple[str, tuple[int, ...]]] = {}
    pieces: list[PieceDescription] = []
    for item in rank_items:
        piece = piece_of(item)
        if item.tensor_data is None:
            arrays[piece[0]] = ("uint8", (0,))
            pieces.append(PieceDescription(piece, (0,), 0))
            continue
        data = item.tensor_data
        arrays[piece[0]] = (stored_dtype_name(data.properties.dtype), tuple(int(n) for n in data.size))
        pieces.append(PieceDescription(piece, tuple(int(n) for n in data.chunk.sizes),
                                       int(item.tensor_storage_size() or 0)))
    return Description(url=info.url, suffix=suffix, max_objects=info.max_objects, arrays=arrays,
                       pieces=tuple(pieces))


def _item_array(item: WriteItem, data: Any) -> Piece:
    """The bytes of one resolved item as a C-contiguous array (a view of the tensor where it can be),
    or, for a tensor off the CPU (CUDA), a ``DeviceArray`` the upload copies through its ring in batches."""
    if isinstance(data, io.BytesIO):
        return np.frombuffer(data.getbuffer(), dtype=np.uint8)
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"DCP item {item.index.fqn!r} resolved to a {type(data).__name__}, not a tensor or bytes")
    tensor = data.detach().resolve_conj().resolve_neg()
    array: Piece | None = torch_device.device_array(tensor)
    if array is None:
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        array = torch_adapter.tensor_to_numpy(tensor)
    assert item.tensor_data is not None
    expected = tuple(int(n) for n in item.tensor_data.chunk.sizes)
    if tuple(array.shape) != expected:
        raise ValueError(f"DCP item {item.index.fqn!r} at {tuple(item.tensor_data.chunk.offsets)} resolved to shape "
                         f"{tuple(array.shape)}, but its plan says {expected}")
    if array.dtype != numpy_dtype(item.tensor_data.properties.dtype):
        raise ValueError(f"DCP item {item.index.fqn!r} resolved to dtype {tensor.dtype}, but its plan says "
                         f"{item.tensor_data.properties.dtype}")
    return array


def _done(value: Any) -> TorchFuture[Any]:
    future: TorchFuture[Any] = TorchFuture()
    future.set_result(value)
    return future


class StorageWriter(Addressed, DCPStorageWriter):
    """Where ``dcp.save`` / ``dcp.async_save`` write: a cloudckpt checkpoint on S3, GCS, local disk, ...

    Args:
        checkpoint_id: the checkpoint path (``"s3://bucket/run/step-100"``), a ``Location``,
            or, with ``storage``, a checkpoint name in it. May be left out and given to
            ``dcp.save(checkpoint_id=...)`` instead (DCP then calls ``reset``).
        storage: an already-open ``Storage`` (custom client, credentials, transfer tuning)
            that bare checkpoint names are resolved in.
        overwrite: replace a checkpoint already committed at the path (atomically: the
            new index replaces the old one in one conditional PUT, and the old data objects
            are deleted after). Without it such a save is refused before any byte is
            written, with ``AlreadyExistsError``.
        coordinator: the processes' coordinator for the writer's few collectives (see the
            module docs); default ``default_coordinator()``.

    Create one on every rank, in the same order (the default coordinator may create the
    checkpoint process group, a collective call).

    ``dcp.async_save(..., async_checkpointer_type=AsyncCheckpointerType.PROCESS)`` sends the
    writer to DCP's checkpoint process with pickle (torch's own transport between its
    processes - the checkpoint *format* never holds pickle). What crosses is the checkpoint
    URL, ``overwrite`` and which coordinator to use, never a client, pool or lock: the child
    opens the storage from the URL (credentials and endpoint from its environment, which it
    inherits) and uses its own default coordinator (a gloo group of the child's process
    group, which DCP sets up over the same ranks) or a ``LocalCoordinator``. A writer whose
    storage was built in code (``storage=``, a ``Location``, a ``register_storage``-ed
    store) or whose coordinator is another one cannot be rebuilt there and refuses to be
    pickled (``TypeError`` saying so). ``last_commit`` is then set in the child, not here.
    """

    def __init__(self, checkpoint_id: CheckpointId | None = None, *, storage: Storage | None = None,
                 overwrite: bool = False, coordinator: Coordinator | None = None) -> None:
        super().__init__()
        self._start_fresh(checkpoint_id, storage, overwrite, coordinator)
        self._coord()  # the default coordinator may create a process group: now, on every rank alike

    def _start_fresh(self, checkpoint_id: CheckpointId | None, storage: Storage | None, overwrite: bool,
                     coordinator: Coordinator | None) -> None:
        """Every attribute, from the constructor's arguments (shared by ``__init__`` and ``__setstate__``)."""
        self._address(checkpoint_id, storage)
        self._from_text = checkpoint_id is None or not isinstance(checkpoint_id, Location)
        self.overwrite = overwrite
        self._given_coordinator = coordinator
        self._coordinator = coordinator
        self._managed = ManagedSave()
        self._storage_meta: StorageMeta | None = None
        self._committer: Committer | None = None
        self._suffix = ""
        self._log = UploadLog()
        #: What the last save committed (on the coordinator rank), for callers that want it.
        self.last_commit: CommittedWrite | None = None

    # ------------------------------------------------------------------ crossing into DCP's checkpoint process
    def __getstate__(self) -> dict[str, Any]:
        """The writer as ``AsyncCheckpointerType.PROCESS`` sends it: URL, options, coordinator kind.

        Raises:
            TypeError: the writer holds what cannot be rebuilt from text in another process.
        """
        why = self._crossing_refusal()
        if why is not None:
            raise TypeError(f"cloudckpt.dcp.StorageWriter({self.checkpoint_id or ''}) cannot be sent to DCP's "
                            f"checkpoint process (AsyncCheckpointerType.PROCESS): {why}; or use "
                            f"AsyncCheckpointerType.THREAD, which shares this process's objects")
        return {"url": self.checkpoint_id, "overwrite": self.overwrite, "local": self._given_coordinator is not None}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        """Rebuild the writer in the child: its storage reopened from the URL, its coordinator
        chosen on first use (the default one creates a process group - a collective that DCP's
        ``set_up_storage_writer`` runs on every rank at the same point)."""
        self._start_fresh(state["url"], None, bool(state["overwrite"]), LocalCoordinator() if state["local"] else None)

    def _crossing_refusal(self) -> str | None:
        """Why this writer cannot be rebuilt in another process from text, or ``None``."""
        if self._managed != ManagedSave():
            return "it is a CheckpointManager's (DCPCheckpoint) writer, whose bookkeeping runs in this process"
        if self._storage is not None or not self._from_text or (
                self._location is not None and is_registered(self._location.storage)):
            return ("its Storage was built in code (storage=, a Location or register_storage), and a client, "
                    "credentials or options given in code do not travel; pass the checkpoint as a URL and "
                    "configure the store through the environment (AWS_ENDPOINT_URL, the AWS and Google "
                    "credential chains, STORAGE_EMULATOR_HOST), which the process inherits")
        given = self._given_coordinator
        if given is not None and type(given) is not LocalCoordinator:
            return (f"its coordinator ({type(given).__name__}) lives in this process; leave coordinator= out "
                    f"(the child uses its own default one over DCP's ranks) or pass LocalCoordinator()")
        return None

    def _commit_step(self) -> Committer:
        """This save's commit step (``set_up_storage_writer`` made it)."""
        if self._committer is None:
            raise ValueError("StorageWriter used before set_up_storage_writer (DCP calls it first)")
        return self._committer

    def _coord(self) -> Coordinator:
        """The coordinator, the process's default one created on first use where none was given."""
        if self._coordinator is None:
            self._coordinator = default_coordinator()
        return self._coordinator

    # ------------------------------------------------------------------ identity
    def reset(self, checkpoint_id: CheckpointId | None = None) -> None:
        self._readdress(checkpoint_id)
        if isinstance(checkpoint_id, Location):
            self._from_text = False

    def storage_meta(self) -> StorageMeta | None:
        self._storage_meta = StorageMeta(checkpoint_id=self.checkpoint_id, save_id=uuid.uuid4().hex)
        return self._storage_meta

    # ------------------------------------------------------------------ DCP's protocol
    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        rank = kwargs.get("rank")
        if not kwargs.get("use_collectives", True):
            raise ValueError("dcp.save(use_collectives=False) makes every rank commit its own metadata; a cloudckpt "
                             "checkpoint has one index, committed once every rank's data is stored")
        coord = self._coord()
        if (rank is not None and rank != coord.rank) or bool(is_coordinator) != (coord.rank == 0):
            raise ValueError(
                f"dcp.save runs this process as rank {rank} (coordinator: {is_coordinator}), but the writer's "
                f"coordinator has it as rank {coord.rank} of {coord.world_size}: with no_dist=True or a DCP "
                f"process_group other than the whole job, pass StorageWriter(coordinator=...) with the same ranks "
                f"(LocalCoordinator() for one process, TorchCoordinator(group=...) for a group)")
        location = self._where()
        self._committer = Committer(location.storage, location.name, after_commit=self._managed.after_commit,
                                    rank=coord.rank)
        self._log = UploadLog()
        self.last_commit = None

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if not plan.usable:
            raise ValueError("DCP's cached save plans (enable_plan_caching=True) are not supported: they would "
                             "reuse an earlier save's object names")
        location = self._where()
        return dataclasses.replace(plan, storage_data=RankInfo(location.url, location.storage.config.max_concurrency))

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        location = self._where()
        infos = [p.storage_data for p in plans]
        if not all(isinstance(info, RankInfo) for info in infos):
            raise ValueError("a rank's save plan did not come through cloudckpt's StorageWriter.prepare_local_plan "
                             "(every rank must use cloudckpt.dcp.StorageWriter)")
        seen = self._commit_step().look()
        if seen is not None and not self.overwrite:
            raise AlreadyExistsError(
                f"{location.url} already holds a committed checkpoint; pass StorageWriter(..., overwrite=True) to "
                f"replace it (atomically: its data is deleted only after the new index is committed)", location.url)
        suffix = self._suffix = new_suffix()
        layout = make_plan([_describe(p.items, info, suffix) for p, info in zip(plans, infos, strict=True)],
                           committer=0, io_rank=None)
        return [dataclasses.replace(p, storage_data=RankLayout(suffix, layout.groups[r], layout.offsets[r],
                                                               layout.total_objects))
                for r, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> TorchFuture[list[WriteResult]]:
        location = self._where()
        layout = plan.storage_data
        if not isinstance(layout, RankLayout):
            raise ValueError("the save plan carries no cloudckpt layout (was prepare_global_plan skipped?)")
        coord = self._coord()
        many = coord.world_size > 1
        session = coord.session() if many and not self._managed.session_held else nullcontext()
        with session:
            base = shared_base(coord, location.storage, self._managed.base, root=0, url=location.url)
            future = self._start(location, plan, planner, layout, base, background=many)
            try:
                if many:
                    wait_for_every_rank(coord, future)
                error = future.exception()
                errors = coord.all_gather_object(None if error is None else describe_error(error))
            except CoordinationError:
                wait_futures([future], timeout=UPLOAD_GRACE)  # let an upload in flight end, then remove it all
                self._commit_step().discard(self._log.snapshot())
                raise
            except BaseException:  # Ctrl-C while polling: stop the upload, then remove what it started
                location.storage.cancel_transfers()
                wait_futures([future], timeout=UPLOAD_GRACE)
                self._commit_step().discard(self._log.snapshot())
                raise
        if any(e is not None for e in errors):
            self._commit_step().discard(self._log.snapshot())
            if error is not None:
                raise error
            # Another rank failed: DCP raises its error on every rank and commits nothing.
        return _done(future.result() if error is None else [])

    def _start(self, location: Location, plan: SavePlan, planner: SavePlanner, layout: RankLayout,
               base: BaseCheckpoint | None, *, background: bool) -> Future[list[WriteResult]]:
        """This rank's upload, on a worker thread when the other ranks must be polled meanwhile."""
        try:
            return start_polled(lambda: self._upload(location, plan, planner, layout, base), background=background,
                                name="cloudckpt-dcp-upload")
        except BaseException:  # Ctrl-C / SystemExit: a PUT may have landed before it
            self._commit_step().discard(self._log.snapshot())
            raise

    def _upload(self, location: Location, plan: SavePlan, planner: SavePlanner, layout: RankLayout,
                base: BaseCheckpoint | None) -> list[WriteResult]:
        """Upload this rank's pieces, leaving out those ``base`` (an incremental save's) already holds."""
        wanted = {piece for group in layout.groups for piece in group}
        pieces: dict[PieceId, Piece] = {}
        items: dict[PieceId, WriteItem] = {}
        for item in plan.items:
            piece = piece_of(item)
            if piece in wanted:  # else: a replica the plan gave another rank
                pieces[piece] = _item_array(item, planner.resolve_data(item))
                items[piece] = item
        missing = wanted - pieces.keys()
        if missing:
            raise ValueError(f"the plan assigns this rank pieces its state does not hold: {sorted(missing)[:4]}")
        objects = plan_objects(location.name, pieces, layout.groups, suffix=layout.suffix,
                               spread=spreads(location.storage, layout.total_objects),
                               index_offset=layout.index_offset, total_objects=layout.total_objects)
        stored = upload(location.storage, objects, range(len(objects.objects)), self._log, base)
        crash_point("after_data_upload")
        sizes = {**{o.name: o.size for o in stored.objects}, **stored.reused}
        return [WriteResult(index=items[piece].index, size_in_bytes=p.length,
                            storage_data=StoredItem(p, sizes[p.object])) for piece, p in stored.pieces.items()]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        location = self._where()
        pieces: dict[PieceId, StoredPiece] = {}
        sizes: dict[str, int] = {}
        for rank_results in results:
            for result in rank_results:
                stored = result.storage_data
                if not isinstance(stored, StoredItem):
                    raise ValueError(f"write result for {result.index.fqn!r} did not come from cloudckpt's writer")
                pieces[(fqn_path(result.index.fqn), stored.piece.start)] = stored.piece
                sizes[stored.piece.object] = stored.object_size
        ours = "." + self._suffix
        written = tuple(DataObject(n, sizes[n]) for n in sorted(sizes) if n.endswith(ours))  # data-0000k: plan order
        objects, chunks = number_objects(written, {n: size for n, size in sizes.items() if not n.endswith(ours)},
                                         pieces)
        committer = self._commit_step()
        fenced: ConcurrentWriterError | None = None
        try:
            if metadata.version is None:
                metadata.version = CURRENT_DCP_VERSION
            index = self._index(location, metadata, chunks, objects)
            self.last_commit = committer.commit(index, written)
        except AfterCommitError as exc:
            if not isinstance(exc.__cause__, ConcurrentWriterError):
                raise
            fenced = exc.__cause__
        except BaseException:
            committer.discard([o.name for o in written])  # kept if the index that names them stands
            raise
        if fenced is not None:
            raise fenced  # fenced: the manager undid this commit; raised as itself, as SaveRun raises it
        committer.delete_replaced()

    def _index(self, location: Location, metadata: Metadata, chunks: Mapping[PieceId, Chunk],
               objects: tuple[DataObject, ...]) -> CheckpointIndex:
        """The index of this save (the commit decodes it back as a reader will before the PUT)."""
        entries: dict[str, Collected] = {"": NodeEntry("object", tuple(fqn_path(f)
                                                                       for f in metadata.state_dict_metadata))}
        for fqn, md in metadata.state_dict_metadata.items():
            path = fqn_path(fqn)
            if isinstance(md, BytesStorageMetadata):
                chunk = chunks.get((path, (0,)))
                if chunk is None:
                    raise ValueError(f"no rank reported writing DCP item {fqn!r}")
                entries[path] = ShardedLeaf((chunk.length,), np.dtype(np.uint8), "bytes", ())
            elif isinstance(md, TensorStorageMetadata):
                for c in md.chunks:
                    if (path, tuple(int(o) for o in c.offsets)) not in chunks:
                        raise ValueError(f"no rank reported writing the chunk of {fqn!r} at {tuple(c.offsets)}")
                entries[path] = ShardedLeaf(tuple(int(n) for n in md.size), numpy_dtype(md.properties.dtype),
                                            "tensor", ())
            else:
                raise TypeError(f"DCP metadata for {fqn!r} is a {type(md).__name__}")
        index = assemble_index(location.name, entries, objects, chunks, self._managed.metadata)
        return dataclasses.replace(index, dcp=encode_dcp_field(metadata, self._storage_meta,
                                                               self._managed.save_counter))

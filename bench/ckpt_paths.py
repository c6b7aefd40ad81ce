"""The save/restore paths ``bench_checkpoint`` compares: cloudckpt and its peers, one factory each.

A factory builds everything its path needs - clients, stores, connections - from a
``Setup``, so the same factory serves the timed runs (built once, untimed) and the
first-request row (built in a fresh process, timed together with the first save or
restore: what a new training job pays before its first checkpoint moves).

Peers that move bytes only (boto3, obstore) store the state's arrays concatenated in one
object, prepared once and untimed; their restore returns views of what they read, so it
is compared value for value like every other path.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MiB = 1024 * 1024
State = dict[str, np.ndarray]
REGION = "us-east-1"


# --------------------------------------------------------------------------- helpers
def fsync_path(path: Path) -> None:
    """fsync a file someone else wrote (safetensors' ``save_file`` takes a name, not a file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def as_tensors(state: State) -> dict[str, Any]:
    """The same memory as torch tensors (``torch.from_numpy``: zero copy)."""
    import torch

    return {k: torch.from_numpy(v) for k, v in state.items()}


def s3_client(endpoint: str) -> Any:
    """boto3 client as the storage bench uses it: no flexible checksums (the peer's best case)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, config=Config(
        request_checksum_calculation="when_required", response_checksum_validation="when_required"))


def s3_delete_prefix(client: Any, bucket: str, prefix: str) -> None:
    """Delete every object under ``prefix`` (untimed clean-up between runs)."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def put_buffer(client: Any, bucket: str, key: str, buffer: io.BytesIO) -> None:
    """One ``put_object`` of an in-memory file (seekable: botocore streams it, no extra copy)."""
    buffer.seek(0)
    client.put_object(Bucket=bucket, Key=key, Body=buffer)


def get_bytes(client: Any, bucket: str, key: str) -> bytes:
    return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())


# --------------------------------------------------------------------------- setup and paths
@dataclass
class SavePath:
    """One way to save and restore the state.

    ``save(i)`` writes run ``i`` to its own location; ``restore(i)`` returns what it read
    (for in-place paths, the destination arrays); ``clear(i)`` removes run ``i`` (untimed).
    """

    target: str
    name: str
    ours: bool
    durability: str
    loading: str
    save: Callable[[int], None]
    restore: Callable[[int], Mapping[str, Any]]
    clear: Callable[[int], None]
    before_restore: Callable[[], None] = lambda: None


@dataclass
class Setup:
    """What every factory builds on: the state, a destination of the same shapes, where to write."""

    state: State
    dest: State
    root: Path  # local disk: each path writes under it
    endpoint: str = ""  # S3: the server and the bucket
    bucket: str = ""
    #: Untimed, after each S3 clear: give the deleted bytes' disk back (SeaweedFS keeps them
    #: until a vacuum; without it a run of many 1 GiB saves fills the disk).
    reclaim: Callable[[], None] | None = None
    _blob: bytes | None = field(default=None, repr=False)
    _helper: Any = field(default=None, repr=False)

    def blob(self) -> bytes:
        """The state's arrays concatenated, for the bytes-only peers (built once, untimed)."""
        if self._blob is None:
            self._blob = b"".join(memoryview(a).cast("B") for a in self.state.values())
        return self._blob

    def views(self, data: Any) -> State:
        """Arrays viewing a buffer laid out like ``blob`` (what a bytes-only restore returns)."""
        out: State = {}
        offset = 0
        for key, a in self.state.items():
            out[key] = np.frombuffer(data, dtype=a.dtype, count=a.size, offset=offset).reshape(a.shape)
            offset += a.nbytes
        return out

    def zero_dest(self) -> None:
        for array in self.dest.values():
            array.fill(0)

    def helper(self) -> Any:
        """A boto3 client for untimed chores (clean-up); never the one a path is timed with."""
        if self._helper is None:
            self._helper = s3_client(self.endpoint)
        return self._helper

    def local_clear(self, name: str) -> Callable[[int], None]:
        return lambda i: shutil.rmtree(self.root / f"{name}-{i}", ignore_errors=True)

    def s3_clear(self, name: str) -> Callable[[int], None]:
        def clear(i: int) -> None:
            s3_delete_prefix(self.helper(), self.bucket, f"{name}-{i}/")
            if self.reclaim is not None:
                self.reclaim()
        return clear


Factory = Callable[[Setup], SavePath]


@dataclass(frozen=True)
class PathSpec:
    """A path by key: where it writes, how to build it, what to import before timing it."""

    key: str
    target: str
    factory: Factory
    modules: tuple[str, ...] = ()


# --------------------------------------------------------------------------- local disk
def local_ours(s: Setup) -> SavePath:
    import cloudckpt

    writer, reader = cloudckpt.Checkpoint(state=s.state), cloudckpt.Checkpoint(state=s.dest)

    def restore(i: int) -> Mapping[str, Any]:
        reader.read(s.root / f"ours-{i}" / "ckpt").assert_consumed()
        return s.dest
    return SavePath("local", "cloudckpt Checkpoint.write / read", True, "fsync files + dir", "in place",
                    lambda i: writer.write(s.root / f"ours-{i}" / "ckpt"), restore, s.local_clear("ours"),
                    s.zero_dest)


def local_plain(s: Setup) -> SavePath:
    """The physical limit: one sequential write + fsync; ``readinto`` straight into the destination arrays."""
    def save(i: int) -> None:
        (s.root / f"plain-{i}").mkdir()
        with open(s.root / f"plain-{i}" / "state.bin", "wb", buffering=0) as f:
            for array in s.state.values():
                f.write(memoryview(array).cast("B"))
            os.fsync(f.fileno())

    def restore(i: int) -> Mapping[str, Any]:
        with open(s.root / f"plain-{i}" / "state.bin", "rb", buffering=0) as f:
            for array in s.dest.values():
                f.readinto(memoryview(array).cast("B"))
        return s.dest
    return SavePath("local", "plain write + fsync / readinto (bytes only)", False, "fsync", "in place", save,
                    restore, s.local_clear("plain"), s.zero_dest)


def local_npz(s: Setup) -> SavePath:
    def save(i: int) -> None:
        (s.root / f"npz-{i}").mkdir()
        with open(s.root / f"npz-{i}" / "state.npz", "wb") as f:
            np.savez(f, **s.state)
            f.flush()
            os.fsync(f.fileno())

    def restore(i: int) -> Mapping[str, Any]:
        with np.load(s.root / f"npz-{i}" / "state.npz") as z:
            return {k: z[k] for k in z.files}
    return SavePath("local", "np.savez / np.load", False, "fsync", "full load", save, restore, s.local_clear("npz"))


def local_torch(s: Setup) -> SavePath:
    import torch

    tensors = as_tensors(s.state)

    def save(i: int) -> None:
        (s.root / f"torch-{i}").mkdir()
        with open(s.root / f"torch-{i}" / "state.pt", "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())

    def restore(i: int) -> Mapping[str, Any]:
        loaded = torch.load(s.root / f"torch-{i}" / "state.pt", weights_only=True)
        return {k: v.numpy() for k, v in loaded.items()}
    return SavePath("local", "torch.save / torch.load", False, "fsync", "full load", save, restore,
                    s.local_clear("torch"))


def local_safetensors(s: Setup) -> SavePath:
    import safetensors.numpy

    def save(i: int) -> None:
        (s.root / f"st-{i}").mkdir()
        safetensors.numpy.save_file(s.state, s.root / f"st-{i}" / "state.safetensors")
        fsync_path(s.root / f"st-{i}" / "state.safetensors")

    def restore(i: int) -> Mapping[str, Any]:
        return safetensors.numpy.load_file(s.root / f"st-{i}" / "state.safetensors")
    return SavePath("local", "safetensors.numpy save_file / load_file", False, "fsync", "full load", save, restore,
                    s.local_clear("st"))


def local_dcp(threads: int) -> Factory:
    def factory(s: Setup) -> SavePath:
        import torch.distributed.checkpoint as dcp

        tensors, dest_tensors = as_tensors(s.state), as_tensors(s.dest)

        def save(i: int) -> None:
            writer = dcp.FileSystemWriter(s.root / f"dcp{threads}-{i}", sync_files=True, thread_count=threads)
            dcp.save(tensors, storage_writer=writer, no_dist=True)

        def restore(i: int) -> Mapping[str, Any]:
            target = dict(dest_tensors)
            dcp.load(target, storage_reader=dcp.FileSystemReader(s.root / f"dcp{threads}-{i}"), no_dist=True)
            return {k: v.numpy() for k, v in target.items()}
        label = "1 thread, default" if threads == 1 else f"{threads} threads"
        return SavePath("local", f"torch DCP FileSystemWriter ({label})", False, "fsync", "in place", save, restore,
                        s.local_clear(f"dcp{threads}"), s.zero_dest)
    return factory


# --------------------------------------------------------------------------- S3
def s3_ours(s: Setup) -> SavePath:
    import cloudckpt

    writer, reader = cloudckpt.Checkpoint(state=s.state), cloudckpt.Checkpoint(state=s.dest)

    def restore(i: int) -> Mapping[str, Any]:
        reader.read(f"s3://{s.bucket}/ours-{i}/ckpt").assert_consumed()
        return s.dest
    return SavePath("s3", "cloudckpt Checkpoint.write / read", True, "PUT", "in place",
                    lambda i: writer.write(f"s3://{s.bucket}/ours-{i}/ckpt"), restore, s.s3_clear("ours"), s.zero_dest)


def s3_npz(s: Setup) -> SavePath:
    client = s3_client(s.endpoint)

    def save(i: int) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **s.state)
        put_buffer(client, s.bucket, f"npz-{i}/state.npz", buffer)

    def restore(i: int) -> Mapping[str, Any]:
        with np.load(io.BytesIO(get_bytes(client, s.bucket, f"npz-{i}/state.npz"))) as z:
            return {k: z[k] for k in z.files}
    return SavePath("s3", "np.savez to memory + put_object / get_object + np.load", False, "PUT", "full load",
                    save, restore, s.s3_clear("npz"))


def s3_torch(s: Setup) -> SavePath:
    import torch

    client = s3_client(s.endpoint)
    tensors = as_tensors(s.state)

    def save(i: int) -> None:
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        put_buffer(client, s.bucket, f"torch-{i}/state.pt", buffer)

    def restore(i: int) -> Mapping[str, Any]:
        loaded = torch.load(io.BytesIO(get_bytes(client, s.bucket, f"torch-{i}/state.pt")), weights_only=True)
        return {k: v.numpy() for k, v in loaded.items()}
    return SavePath("s3", "torch.save to memory + put_object / get_object + torch.load", False, "PUT", "full load",
                    save, restore, s.s3_clear("torch"))


def s3_safetensors(s: Setup) -> SavePath:
    import safetensors.numpy

    client = s3_client(s.endpoint)

    def save(i: int) -> None:
        client.put_object(Bucket=s.bucket, Key=f"st-{i}/state.safetensors", Body=safetensors.numpy.save(s.state))

    def restore(i: int) -> Mapping[str, Any]:
        return safetensors.numpy.load(get_bytes(client, s.bucket, f"st-{i}/state.safetensors"))
    return SavePath("s3", "safetensors.numpy.save + put_object / get_object + load", False, "PUT", "full load",
                    save, restore, s.s3_clear("st"))


def s3_dcp_fsspec(threads: int) -> Factory:
    def factory(s: Setup) -> SavePath:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        tensors, dest_tensors = as_tensors(s.state), as_tensors(s.dest)

        def save(i: int) -> None:
            # sync_files=False: on a non-local stream DCP's "sync" falls back to os.sync() of the
            # whole machine, which says nothing about S3 (a PUT is durable when it returns).
            writer = FsspecWriter(f"s3://{s.bucket}/fsdcp{threads}-{i}", sync_files=False, thread_count=threads,
                                  endpoint_url=s.endpoint)
            dcp.save(tensors, storage_writer=writer, no_dist=True)

        def restore(i: int) -> Mapping[str, Any]:
            target = dict(dest_tensors)
            reader = FsspecReader(f"s3://{s.bucket}/fsdcp{threads}-{i}", endpoint_url=s.endpoint)
            dcp.load(target, storage_reader=reader, no_dist=True)
            return {k: v.numpy() for k, v in target.items()}
        label = "1 thread, default" if threads == 1 else f"{threads} threads"
        return SavePath("s3", f"torch DCP FsspecWriter/Reader over s3fs ({label})", False, "PUT", "in place", save,
                        restore, s.s3_clear(f"fsdcp{threads}"), s.zero_dest)
    return factory


def s3_boto3(s: Setup) -> SavePath:
    """One ``put_object`` / one ``get_object`` of the state's bytes: the transport alone."""
    client = s3_client(s.endpoint)
    blob = s.blob()

    def restore(i: int) -> Mapping[str, Any]:
        return s.views(client.get_object(Bucket=s.bucket, Key=f"boto-{i}/state.bin")["Body"].read())
    return SavePath("s3", "boto3 one put_object / get_object (bytes only)", False, "PUT", "full load",
                    lambda i: client.put_object(Bucket=s.bucket, Key=f"boto-{i}/state.bin", Body=blob), restore,
                    s.s3_clear("boto"))


def _obstore(s: Setup) -> Any:
    from obstore.store import S3Store

    options: dict[str, Any] = {"allow_http": True}
    ca_bundle = os.environ.get("AWS_CA_BUNDLE")
    if s.endpoint.startswith("https://") and ca_bundle:  # a TLS endpoint with its own CA (bench cpu)
        options["root_certificate"] = Path(ca_bundle).read_bytes()
    return S3Store(s.bucket, endpoint=s.endpoint, region=REGION, virtual_hosted_style_request=False,
                   client_options=options)


def s3_obstore_one(s: Setup) -> SavePath:
    import obstore

    store = _obstore(s)
    blob = s.blob()

    def restore(i: int) -> Mapping[str, Any]:
        return s.views(obstore.get(store, f"ob1-{i}/state.bin").bytes())
    return SavePath("s3", "obstore one PUT / one GET (bytes only)", False, "PUT", "full load",
                    lambda i: obstore.put(store, f"ob1-{i}/state.bin", blob, use_multipart=False), restore,
                    s.s3_clear("ob1"))


def s3_obstore_parts(s: Setup) -> SavePath:
    """obstore's own parallel paths at their defaults: multipart upload, ``get_ranges`` of every array."""
    import obstore

    store = _obstore(s)
    blob = s.blob()
    starts, lengths = [], []
    for array in s.state.values():
        starts.append(sum(lengths))
        lengths.append(array.nbytes)

    def restore(i: int) -> Mapping[str, Any]:
        parts = obstore.get_ranges(store, f"obm-{i}/state.bin", starts=starts, lengths=lengths)
        return {key: np.frombuffer(part, dtype=a.dtype).reshape(a.shape)
                for (key, a), part in zip(s.state.items(), parts, strict=True)}
    return SavePath("s3", "obstore multipart PUT / get_ranges (bytes only, defaults)", False, "PUT", "full load",
                    lambda i: obstore.put(store, f"obm-{i}/state.bin", blob, use_multipart=True), restore,
                    s.s3_clear("obm"))


def _s3torch_config() -> Any:
    from s3torchconnector import S3ClientConfig

    return S3ClientConfig(force_path_style=True)  # the endpoint comes from AWS_ENDPOINT_URL


def s3_torchconnector_dcp(threads: int) -> Factory:
    def factory(s: Setup) -> SavePath:
        import torch.distributed.checkpoint as dcp
        from s3torchconnector.dcp import S3StorageReader, S3StorageWriter

        tensors, dest_tensors = as_tensors(s.state), as_tensors(s.dest)
        config = _s3torch_config()

        def save(i: int) -> None:
            writer = S3StorageWriter(REGION, f"s3://{s.bucket}/s3tdcp{threads}-{i}", s3client_config=config,
                                     thread_count=threads)
            dcp.save(tensors, storage_writer=writer, no_dist=True)

        def restore(i: int) -> Mapping[str, Any]:
            target = dict(dest_tensors)
            reader = S3StorageReader(REGION, f"s3://{s.bucket}/s3tdcp{threads}-{i}", s3client_config=config)
            dcp.load(target, storage_reader=reader, no_dist=True)
            return {k: v.numpy() for k, v in target.items()}
        label = "1 thread, default" if threads == 1 else f"{threads} threads"
        return SavePath("s3", f"s3torchconnector DCP S3StorageWriter/Reader ({label})", False, "PUT", "in place",
                        save, restore, s.s3_clear(f"s3tdcp{threads}"), s.zero_dest)
    return factory


def s3_torchconnector_checkpoint(s: Setup) -> SavePath:
    import torch
    from s3torchconnector import S3Checkpoint

    checkpoint = S3Checkpoint(REGION, s3client_config=_s3torch_config())
    tensors = as_tensors(s.state)

    def save(i: int) -> None:
        with checkpoint.writer(f"s3://{s.bucket}/s3tck-{i}/state.pt") as f:
            torch.save(tensors, f)

    def restore(i: int) -> Mapping[str, Any]:
        with checkpoint.reader(f"s3://{s.bucket}/s3tck-{i}/state.pt") as f:
            loaded = torch.load(f, weights_only=True)
        return {k: v.numpy() for k, v in loaded.items()}
    return SavePath("s3", "s3torchconnector S3Checkpoint + torch.save / torch.load", False, "PUT", "full load", save,
                    restore, s.s3_clear("s3tck"))


def s3_tensorstore(ocdbt: bool) -> Factory:
    """tensorstore's zarr3 driver on its own s3 kvstore, one array per state entry, written and read concurrently."""
    def factory(s: Setup) -> SavePath:
        import tensorstore as ts

        context = ts.Context()
        name = "tso" if ocdbt else "ts"

        def spec(i: int, key: str) -> dict[str, Any]:
            s3 = {"driver": "s3", "bucket": s.bucket, "endpoint": s.endpoint, "aws_region": REGION,
                  "path": f"{name}-{i}/"}
            if ocdbt:
                return {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": s3, "path": f"{key}/"}}
            return {"driver": "zarr3", "kvstore": {**s3, "path": f"{name}-{i}/{key}/"}}

        def save(i: int) -> None:
            opened = [(ts.open(spec(i, key), create=True, dtype=ts.dtype(a.dtype.name), shape=a.shape,
                               context=context), a) for key, a in s.state.items()]
            writes = [future.result().write(a) for future, a in opened]
            for write in writes:
                write.result()

        def restore(i: int) -> Mapping[str, Any]:
            opened = {key: ts.open(spec(i, key), context=context) for key in s.state}
            reads = {key: future.result().read() for key, future in opened.items()}
            return {key: read.result() for key, read in reads.items()}
        label = "zarr3 + OCDBT" if ocdbt else "zarr3"
        return SavePath("s3", f"tensorstore {label} on its s3 kvstore", False, "PUT", "full load", save, restore,
                        s.s3_clear(name))
    return factory


def local_specs(dcp_threads: int) -> list[PathSpec]:
    specs = [PathSpec("local-ours", "local", local_ours, ("cloudckpt",)),
             PathSpec("local-plain", "local", local_plain),
             PathSpec("local-npz", "local", local_npz),
             PathSpec("local-torch", "local", local_torch, ("torch",)),
             PathSpec("local-st", "local", local_safetensors, ("safetensors.numpy",)),
             PathSpec("local-dcp1", "local", local_dcp(1), ("torch.distributed.checkpoint",))]
    if dcp_threads > 1:
        specs.append(PathSpec(f"local-dcp{dcp_threads}", "local", local_dcp(dcp_threads),
                              ("torch.distributed.checkpoint",)))
    return specs


def s3_specs(dcp_threads: int) -> list[PathSpec]:
    dcp = ("torch.distributed.checkpoint",)
    specs = [PathSpec("s3-ours", "s3", s3_ours, ("cloudckpt", "boto3")),
             PathSpec("s3-boto3", "s3", s3_boto3, ("boto3",)),
             PathSpec("s3-obstore", "s3", s3_obstore_one, ("obstore", "obstore.store")),
             PathSpec("s3-obstore-parts", "s3", s3_obstore_parts, ("obstore", "obstore.store")),
             PathSpec("s3-npz", "s3", s3_npz, ("boto3",)),
             PathSpec("s3-torch", "s3", s3_torch, ("boto3", "torch")),
             PathSpec("s3-st", "s3", s3_safetensors, ("boto3", "safetensors.numpy")),
             PathSpec("s3-fsdcp1", "s3", s3_dcp_fsspec(1), (*dcp, "s3fs")),
             PathSpec("s3-s3tdcp1", "s3", s3_torchconnector_dcp(1), (*dcp, "s3torchconnector.dcp")),
             PathSpec("s3-s3tck", "s3", s3_torchconnector_checkpoint, ("torch", "s3torchconnector")),
             PathSpec("s3-ts", "s3", s3_tensorstore(False), ("tensorstore",)),
             PathSpec("s3-tso", "s3", s3_tensorstore(True), ("tensorstore",))]
    if dcp_threads > 1:
        specs += [PathSpec(f"s3-fsdcp{dcp_threads}", "s3", s3_dcp_fsspec(dcp_threads), (*dcp, "s3fs")),
                  PathSpec(f"s3-s3tdcp{dcp_threads}", "s3", s3_torchconnector_dcp(dcp_threads),
                           (*dcp, "s3torchconnector.dcp"))]
    return specs

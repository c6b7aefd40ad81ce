"""The one commit step (``saving.committer``): what every save path commits through (issue 23).

The DCP side of it (a rival commit during the upload, the old error name) is in test_dcp.py,
with the other in-process DCP tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloudckpt import Checkpoint, Variable
from cloudckpt.errors import AfterCommitError, CheckpointFormatError, DistributedSaveError
from cloudckpt.format import ArrayEntry, CheckpointIndex, DataObject, NodeEntry, data_key
from cloudckpt.format.index_fetch import head_index, load_index
from cloudckpt.saving import CommittedWrite, Committer
from cloudckpt.storage import resolve


def test_an_index_that_would_not_decode_is_never_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug upstream of the commit (here: a stored piece missing from what the upload reports, so the
    array gets no chunk) fails the save; before, the plain pipeline committed an index no reader accepts."""
    from cloudckpt.saving import pipeline

    real_upload = pipeline.upload

    def loses_a_piece(*args: Any, **kwargs: Any) -> Any:
        stored = real_upload(*args, **kwargs)
        for piece in list(stored.pieces):
            if piece[0] == "b":
                del stored.pieces[piece]
        return stored

    monkeypatch.setattr(pipeline, "upload", loses_a_piece)
    ckpt = Checkpoint(a=Variable(np.arange(4.0)), b=Variable(np.ones(3)))
    with pytest.raises(CheckpointFormatError, match="chunk"):
        ckpt.write(tmp_path / "ck")
    assert not list(tmp_path.glob("ck*"))  # no index, and the data objects were removed


def _one_array_index(tmp_path: Path) -> tuple[Any, CheckpointIndex, DataObject]:
    from cloudckpt.format import Chunk
    from cloudckpt.storage.checksum import crc32c_of

    location = resolve(tmp_path / "ck")
    values = np.arange(4.0)
    key = data_key(location.name, 0, 1, "abc123")
    location.storage.put(key, values.tobytes())
    chunk = Chunk(0, 0, values.nbytes, crc32c_of([values.tobytes()]), (0,), (4,))
    entries = {"": NodeEntry("object", ("w",)), "w": ArrayEntry("float64", (4,), "ndarray", (chunk,))}
    obj = DataObject(key, values.nbytes)
    return location, CheckpointIndex(location.name, entries, (obj,)), obj


def test_failed_bookkeeping_is_the_one_committed_but_error(tmp_path: Path) -> None:
    """The commit stands, the data stays, and the error says so (its cause chained), on every path alike."""
    location, index, obj = _one_array_index(tmp_path)
    seen: list[CommittedWrite] = []

    def bookkeeping(written: CommittedWrite) -> None:
        seen.append(written)
        raise OSError("injected: state file refused")

    committer = Committer(location.storage, location.name, after_commit=bookkeeping, rank=3)
    assert committer.look() is None
    with pytest.raises(AfterCommitError, match="complete and valid") as info:
        committer.commit(index, [obj])
    assert isinstance(info.value, DistributedSaveError) and info.value.committed
    assert info.value.failures == {3: "OSError: injected: state file refused"}
    assert isinstance(info.value.__cause__, OSError)
    [written] = seen
    assert (written.name, written.objects, written.data_keys) == (location.name, 2, (obj.name,))
    assert written.reused_bytes == 0
    assert written.bytes > obj.size and written.index_version is not None
    committer.discard([obj.name])  # an interrupt after the commit must not take a complete checkpoint's data
    assert head_index(location.storage, location.name) is not None
    assert load_index(location.storage, location.name).objects == (obj,)
    assert location.storage.head(obj.name) is not None
    assert not DistributedSaveError("x", {}).committed

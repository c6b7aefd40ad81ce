"""Reading TensorFlow's own checkpoints (the TensorBundle format) without TensorFlow.

``tf.train.Checkpoint``, ``CheckpointManager`` and V1 ``Saver`` (format V2) write a
checkpoint as ``<name>.index`` - a LevelDB-style table of protobuf entries - and
``<name>.data-0000k-of-0000N`` shards. This package reads them from any cloudckpt store,
in pure Python and numpy: ``table`` (the table), ``wire`` (the protobuf wire format),
``entries`` (header, tensor entries, dtypes, slices), ``strings`` (``tf.string`` tensors),
``objects`` (the object graph and the names it gives tensors), ``bundle`` (the reader).
Read, never written. See docs/tensorflow-import.md.

The package sits above the core, beside ``Checkpoint``: importing it registers its reader
with the format layer's sniffer (``cloudckpt.format.sniff.register_reader``), which is how
``Checkpoint.restore``, ``load_checkpoint`` and the deletion rule in ``references`` see a
TensorFlow checkpoint without importing this package. ``import cloudckpt`` imports it.
"""

from cloudckpt.format.sniff import ForeignCheckpoint, IndexFormat, register_reader
from cloudckpt.storage import Storage
from cloudckpt.tfbundle.bundle import (
    Bundle,
    Tensor,
    data_object,
    is_bundle_index,
    load_any_index,
    nested,
    tensor_value,
)
from cloudckpt.tfbundle.view import BundleView


def open_foreign(storage: Storage, name: str, index_bytes: bytes) -> ForeignCheckpoint:
    """A TensorFlow checkpoint as the core handles it (validated now, as ``Bundle`` validates)."""
    bundle = Bundle(storage, name, index_bytes)
    return ForeignCheckpoint(IndexFormat.TENSORFLOW, bundle.url, frozenset(bundle.objects), BundleView(bundle), bundle)


register_reader(IndexFormat.TENSORFLOW, open_foreign)

__all__ = ["Bundle", "Tensor", "data_object", "is_bundle_index", "load_any_index", "nested",
           "open_foreign", "tensor_value"]

"""Reading TensorFlow's own checkpoints (the TensorBundle format) without TensorFlow.

``tf.train.Checkpoint``, ``CheckpointManager`` and V1 ``Saver`` (format V2) write a
checkpoint as ``<name>.index`` - a LevelDB-style table of protobuf entries - and
``<name>.data-0000k-of-0000N`` shards. This package reads them from any cloudckpt store,
in pure Python and numpy: ``table`` (the table), ``wire`` (the protobuf wire format),
``entries`` (header, tensor entries, dtypes, slices), ``strings`` (``tf.string`` tensors),
``objects`` (the object graph and the names it gives tensors), ``bundle`` (the reader).
Read, never written. See docs/tensorflow-import.md.
"""

from cloudckpt.tfbundle.bundle import (
    Bundle,
    Tensor,
    data_object,
    is_bundle_index,
    load_any_index,
    nested,
    tensor_value,
)

__all__ = ["Bundle", "Tensor", "data_object", "is_bundle_index", "load_any_index", "nested", "tensor_value"]

"""A TensorFlow checkpoint behind ``cloudckpt.CheckpointReader``'s methods (``tf.train.load_checkpoint``).

Names are object paths (``model/dense/kernel``) where the object graph gives them, and raw
bundle keys (``model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE``) are accepted as well; values
come back as TensorFlow's ``get_tensor`` returns them (a 0-d tensor as a numpy scalar, or
``bytes`` for a string).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cloudckpt.tfbundle.bundle import Bundle, nested, tensor_value


class BundleView:
    """The read-only methods of ``CheckpointReader``, over a :class:`Bundle`."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        return {t.name: list(t.shape) for t in self.bundle.tensors()}

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype[Any] | type]:
        """numpy dtypes; ``object`` for strings (arrays of ``bytes``); resource/variant are left out."""
        out: dict[str, np.dtype[Any] | type] = {}
        for tensor in self.bundle.tensors():
            if tensor.numpy_dtype is not None:
                out[tensor.name] = tensor.numpy_dtype
        return out

    def has_tensor(self, name: str) -> bool:
        try:
            self.bundle.resolve(name)
        except KeyError:
            return False
        return True

    def get_tensor(self, name: str) -> Any:
        """One tensor (fetching only its bytes), or the tensors under an object path as nested dicts."""
        try:
            key = self.bundle.resolve(name)
        except KeyError:
            tree = nested(self.bundle, name)
            if tree is None:
                raise
            return tree
        return tensor_value(self.bundle.read([key])[key])  # errors name the object path, not the key

    def restore(self, name: str, target: Any) -> None:
        raise NotImplementedError(
            f"restoring into objects from the TensorFlow checkpoint {self.bundle.url} is not supported; "
            f"read values with get_tensor({name!r}) (or cloudckpt export) instead")

"""cloudckpt: TensorFlow's checkpoint API for numpy and PyTorch state, on S3, GCS and local disk.

The package imports light: cloud SDKs and torch load only when a URL or an object needs them.
"""

from cloudckpt import errors
from cloudckpt.storage import open_storage

__version__ = "0.1.0"

__all__ = ["__version__", "errors", "open_storage"]

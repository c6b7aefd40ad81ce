"""The on-store format: object names, key paths, dtypes and the index (manifest).

Internal: not a public path (docs/architecture.md lists those), so it may move between releases.

A checkpoint at ``<dir>/<name>`` is the object ``<name>.index`` (JSON, written last: its
presence is the commit) plus data objects ``<name>.data-0000k-of-0000N.<suffix>``, whose
suffix is unique to the write that made them. docs/format.md is the human-readable
specification; this package is the only code that encodes or decodes it.

Modules, one job each: ``naming`` (object names), ``keypaths`` (key path codec), ``dtypes``,
``entries`` (the index model and its limits), ``encode``, ``decode`` (the strict validator),
``chunks`` (chunk lists and grids), ``partition`` (the proof that boxes tile an array),
``content_hash``, ``index_fetch`` (the one guarded way to read an index from storage),
``sniff`` (which format an index is), ``references`` (which objects committed indexes name)
and ``state_file``. This package re-exports the index model for the layers above; modules
inside it import from the defining module.
"""

from cloudckpt.format.chunks import Chunk as Chunk
from cloudckpt.format.decode import decode_index as decode_index
from cloudckpt.format.dtypes import ML_DTYPE_NAMES as ML_DTYPE_NAMES
from cloudckpt.format.dtypes import dtype_name as dtype_name
from cloudckpt.format.dtypes import ml_dtype as ml_dtype
from cloudckpt.format.dtypes import parse_dtype as parse_dtype
from cloudckpt.format.dtypes import storage_dtype as storage_dtype
from cloudckpt.format.encode import encode_index as encode_index
from cloudckpt.format.encode import encode_value as encode_value
from cloudckpt.format.entries import ADAPTERS as ADAPTERS
from cloudckpt.format.entries import ARRAY_PYTYPES as ARRAY_PYTYPES
from cloudckpt.format.entries import FORMAT_NAME as FORMAT_NAME
from cloudckpt.format.entries import FORMAT_VERSION as FORMAT_VERSION
from cloudckpt.format.entries import MAX_BYTES as MAX_BYTES
from cloudckpt.format.entries import MAX_CHUNKS_PER_ARRAY as MAX_CHUNKS_PER_ARRAY
from cloudckpt.format.entries import MAX_ITEMSIZE as MAX_ITEMSIZE
from cloudckpt.format.entries import MAX_KEY_PATH as MAX_KEY_PATH
from cloudckpt.format.entries import MAX_NDIM as MAX_NDIM
from cloudckpt.format.entries import NODE_TYPES as NODE_TYPES
from cloudckpt.format.entries import READABLE_VERSIONS as READABLE_VERSIONS
from cloudckpt.format.entries import VALUE_TYPES as VALUE_TYPES
from cloudckpt.format.entries import ArrayEntry as ArrayEntry
from cloudckpt.format.entries import ArrayPyType as ArrayPyType
from cloudckpt.format.entries import CheckpointIndex as CheckpointIndex
from cloudckpt.format.entries import DataObject as DataObject
from cloudckpt.format.entries import Entry as Entry
from cloudckpt.format.entries import NodeEntry as NodeEntry
from cloudckpt.format.entries import NodeType as NodeType
from cloudckpt.format.entries import ValueEntry as ValueEntry
from cloudckpt.format.entries import ValueType as ValueType
from cloudckpt.format.entries import referenced_checkpoints as referenced_checkpoints
from cloudckpt.format.keypaths import INDEX_SEGMENT as INDEX_SEGMENT
from cloudckpt.format.keypaths import decode_segment as decode_segment
from cloudckpt.format.keypaths import encode_segment as encode_segment
from cloudckpt.format.keypaths import join_path as join_path
from cloudckpt.format.keypaths import parent_path as parent_path
from cloudckpt.format.naming import CHECKPOINT_NAME as CHECKPOINT_NAME
from cloudckpt.format.naming import CONTENT_HASH as CONTENT_HASH
from cloudckpt.format.naming import DATA_INFIX as DATA_INFIX
from cloudckpt.format.naming import DATA_OBJECT as DATA_OBJECT
from cloudckpt.format.naming import INDEX_SUFFIX as INDEX_SUFFIX
from cloudckpt.format.naming import SPREAD_INFIX as SPREAD_INFIX
from cloudckpt.format.naming import data_key as data_key
from cloudckpt.format.naming import index_key as index_key
from cloudckpt.format.naming import object_checkpoint as object_checkpoint
from cloudckpt.format.naming import renamed_object as renamed_object

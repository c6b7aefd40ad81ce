"""The object graph TensorFlow stores in a checkpoint, and the names it gives the tensors.

``tf.train.Checkpoint`` writes a ``TrackableObjectGraph`` proto as the DT_STRING scalar
``_CHECKPOINTABLE_OBJECT_GRAPH``::

    TrackableObjectGraph { repeated TrackableObject nodes = 1 }      node 0 is the root
    TrackableObject {
      repeated ObjectReference children = 1 { int32 node_id = 1; string local_name = 2 }
      repeated SerializedTensor attributes = 2 { string name = 1; string full_name = 2;
                                                 string checkpoint_key = 3 }
      repeated SlotVariableReference slot_variables = 3 { int32 original_variable_node_id = 1;
                                                          string slot_name = 2;
                                                          int32 slot_variable_node_id = 3 }
    }

The raw bundle keys escape each local name (``.`` -> ``..``, ``/`` -> ``.S``) and append
``/.ATTRIBUTES/<attribute>`` (``model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE``). The
*object path* of a tensor is what a user wrote instead: the local names from the root,
each made a cloudckpt key segment (``encode_segment``: ``/`` in a name becomes ``~1``),
so ``model/dense/kernel``. A ``VARIABLE_VALUE`` attribute is named by its object's path;
any other attribute by ``<object path>/<attribute name>``. An optimizer's slot variable is
named as TensorFlow keys it, unescaped: ``<variable path>/.OPTIMIZER_SLOT/<optimizer
path>/<slot name>``.

Paths are found breadth-first from the root (the shortest path, as TensorFlow names keys),
iteratively: a deep or cyclic graph costs time linear in its size, never recursion.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format import encode_segment
from cloudckpt.tfbundle import wire

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VARIABLE_VALUE = "VARIABLE_VALUE"
SLOT_SEGMENT = ".OPTIMIZER_SLOT"
#: Most nodes an object graph may have (each takes at least 2 bytes of the proto anyway).
MAX_NODES = 1 << 24


def _node(data: bytes, where: str) -> tuple[list[tuple[int, str]], list[tuple[str, str]], list[tuple[int, str, int]]]:
    children: list[tuple[int, str]] = []
    attributes: list[tuple[str, str]] = []
    slots: list[tuple[int, str, int]] = []
    for field in wire.fields(data, where):
        if field.number == 1:
            node_id, local = 0, ""
            for sub in wire.fields(wire.as_bytes(field, where), where):
                if sub.number == 1:
                    node_id = wire.as_int(sub, where, bits=32)
                elif sub.number == 2:
                    local = wire.as_text(sub, where)
            children.append((node_id, local))
        elif field.number == 2:
            name, key = "", ""
            for sub in wire.fields(wire.as_bytes(field, where), where):
                if sub.number == 1:
                    name = wire.as_text(sub, where)
                elif sub.number == 3:
                    key = wire.as_text(sub, where)
            attributes.append((name, key))
        elif field.number == 3:
            original, slot, variable = 0, "", 0
            for sub in wire.fields(wire.as_bytes(field, where), where):
                if sub.number == 1:
                    original = wire.as_int(sub, where, bits=32)
                elif sub.number == 2:
                    slot = wire.as_text(sub, where)
                elif sub.number == 3:
                    variable = wire.as_int(sub, where, bits=32)
            slots.append((original, slot, variable))
    return children, attributes, slots


def object_paths(graph: bytes, url: str) -> dict[str, str]:
    """Raw bundle key -> object path, for every tensor the object graph describes.

    Raises:
        CheckpointFormatError: the graph does not parse, or names a node that does not exist.
    """
    where = f"{url}: object graph"
    nodes: list[tuple[list[tuple[int, str]], list[tuple[str, str]], list[tuple[int, str, int]]]] = []
    for field in wire.fields(graph, where):
        if field.number == 1:
            nodes.append(_node(wire.as_bytes(field, where), f"{where} node {len(nodes)}"))
            if len(nodes) > MAX_NODES:
                raise CheckpointFormatError(f"{where}: more than {MAX_NODES} nodes")
    if not nodes:
        return {}

    def node_at(node_id: int) -> int:
        if not 0 <= node_id < len(nodes):
            raise CheckpointFormatError(f"{where}: reference to node {node_id} of {len(nodes)}")
        return node_id

    paths: dict[int, str] = {0: ""}
    queue = deque([0])
    while queue:
        current = queue.popleft()
        for child, local in nodes[current][0]:
            child = node_at(child)
            if child not in paths:
                paths[child] = _join(paths[current], encode_segment(local))
                queue.append(child)
    # Slot variables hang off their optimizer, not the tree: name them the way TF keys them.
    for optimizer, (_, _, slots) in enumerate(nodes):
        if optimizer not in paths:
            continue
        for original, slot, variable in slots:
            original, variable = node_at(original), node_at(variable)
            if variable not in paths and original in paths:
                paths[variable] = "/".join((paths[original], SLOT_SEGMENT, paths[optimizer],
                                            encode_segment(slot)))
    out: dict[str, str] = {}
    for node_id, path in paths.items():
        for name, key in nodes[node_id][1]:
            if key:
                out[key] = path if name == VARIABLE_VALUE else _join(path, encode_segment(name))
    return out


def _join(parent: str, segment: str) -> str:
    return f"{parent}/{segment}" if parent else segment


def assign_names(keys: list[str], paths: Mapping[str, str]) -> dict[str, str]:
    """Display name of each listed raw key: its object path, or the raw key itself.

    The raw key stays when there is no path for it (a V1 ``Saver`` checkpoint has no object
    graph), when the path is empty (an attribute of the root object), or when the path is
    taken - by another tensor's path or by a raw key - so every name means one tensor.
    """
    taken = set(keys)
    names: dict[str, str] = {}
    for key in keys:
        path = paths.get(key)
        if path and path not in taken:
            names[key] = path
            taken.add(path)
        else:
            names[key] = key
    return names

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
iteratively: a deep or cyclic graph costs time linear in its size, never recursion. A
node's path is as long as its depth, so the paths of every node of a deep chain spell bytes
quadratic in the graph: they are kept as parent links and lengths (``_Tree``), only the
paths of nodes that hold tensors are built, and a graph whose tensors' paths would spell
more than ``PATH_EXPANSION`` bytes per byte of it is refused (a real graph holds each
tensor's checkpoint key, about as long as its path).
"""

from __future__ import annotations

from array import array
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
#: Bytes of object paths (and steps building them) the tensors' names may take per byte of
#: the graph. A real graph holds each tensor's checkpoint key, about as long as its path.
PATH_EXPANSION = 16
_SATURATED = 1 << 62


_Node = tuple[tuple[tuple[int, str], ...], tuple[tuple[str, str], ...], tuple[tuple[int, str, int], ...]]


def _node(data: bytes, where: str) -> _Node:
    """``(children, attributes, slot variables)`` of one node, as tuples (a graph may hold millions)."""
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
    return tuple(children), tuple(attributes), tuple(slots)


def object_paths(graph: bytes, url: str) -> dict[str, str]:
    """Raw bundle key -> object path, for every tensor the object graph describes.

    Raises:
        CheckpointFormatError: the graph does not parse, names a node that does not exist, or
            nests its tensors so deep that their paths would outgrow it ``PATH_EXPANSION``-fold.
    """
    where = f"{url}: object graph"
    nodes: list[_Node] = []
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

    tree = _Tree(len(nodes))
    queue = deque([0])
    while queue:
        current = queue.popleft()
        for child, local in nodes[current][0]:
            child = node_at(child)
            if not tree.known(child):
                tree.add_child(child, current, encode_segment(local))
                queue.append(child)
    # Slot variables hang off their optimizer, not the tree: name them the way TF keys them.
    for optimizer, (_, _, slots) in enumerate(nodes):
        if not tree.known(optimizer):
            continue
        for original, slot, variable in slots:
            original, variable = node_at(original), node_at(variable)
            if not tree.known(variable) and tree.known(original):
                tree.add_slot(variable, original, optimizer, encode_segment(slot))
    named = [node for node in tree.order if any(key for _, key in nodes[node][1])]
    needed = tree.needed(named)
    cost = sum(tree.length[n] + tree.steps[n] for n in needed)
    if cost > PATH_EXPANSION * len(graph) + 4096:
        raise CheckpointFormatError(
            f"{where}: naming its tensors would spell {cost} bytes of object paths from a {len(graph)}-byte graph "
            f"(more than {PATH_EXPANSION} per byte: objects nested far deeper than their keys say)")
    paths = tree.build(needed)
    out: dict[str, str] = {}
    for node_id in named:
        path = paths[node_id]
        for name, key in nodes[node_id][1]:
            if key:
                out[key] = path if name == VARIABLE_VALUE else _join(path, encode_segment(name))
    return out


class _Tree:
    """The object paths of a graph's nodes, as parent links and lengths; strings only on demand.

    A node's path is as long as its depth, so a chain of ``n`` objects has paths of ``n^2 / 2``
    bytes in all; building them for every node made memory quadratic in the graph. Here each
    node costs a few machine words (its parent, its segment, its path's length and the steps
    that build it), and only the paths a tensor needs are built - after their total length has
    been checked against the graph's size.
    """

    def __init__(self, count: int) -> None:
        self.parent = array("q", [-1]) * count
        self.segment: list[str] = [""] * count
        self.length = array("q", [-1]) * count  # -1: no path (not reached)
        self.steps = array("q", [0]) * count
        self.slot: dict[int, tuple[int, int]] = {}  # slot variable -> (original, optimizer)
        self.order = [0]  # nodes in the order their paths were found (the root first)
        self.length[0] = 0

    def known(self, node: int) -> bool:
        return self.length[node] >= 0

    def add_child(self, node: int, parent: int, segment: str) -> None:
        """``node``'s path is ``parent``'s joined with ``segment`` (``_join``)."""
        above = self.length[parent]
        self.parent[node] = parent
        self.segment[node] = segment
        self.length[node] = min(len(segment) + (above + 1 if above else 0), _SATURATED)
        self.steps[node] = min(self.steps[parent] + 1, _SATURATED)
        self.order.append(node)

    def add_slot(self, node: int, original: int, optimizer: int, segment: str) -> None:
        """``node``'s path is ``<original>/.OPTIMIZER_SLOT/<optimizer>/<segment>``."""
        self.slot[node] = (original, optimizer)
        self.segment[node] = segment
        self.length[node] = min(self.length[original] + self.length[optimizer] + len(SLOT_SEGMENT) + len(segment)
                                + 3, _SATURATED)
        self.steps[node] = min(self.steps[original] + self.steps[optimizer] + 1, _SATURATED)
        self.order.append(node)

    def needed(self, named: list[int]) -> list[int]:
        """``named`` and the nodes their slot paths are built from, in ``order``."""
        wanted = set(named)
        for node in reversed(self.order):  # a slot's parts were found before it
            if node in wanted and node in self.slot:
                wanted.update(self.slot[node])
        return [node for node in self.order if node in wanted]

    def build(self, nodes: list[int]) -> dict[int, str]:
        """The paths of ``nodes`` (given in ``order``: what a slot path is built from comes first)."""
        built: dict[int, str] = {}
        for node in nodes:
            if node in self.slot:
                original, optimizer = self.slot[node]
                built[node] = "/".join((built[original], SLOT_SEGMENT, built[optimizer], self.segment[node]))
                continue
            segments: list[str] = []
            above, prefix = node, ""
            while above > 0:
                if above in built:
                    prefix = built[above]
                    break
                segments.append(self.segment[above])
                above = self.parent[above]
            segments.reverse()
            if not prefix:  # _join: a segment after an empty path stands alone
                first = next((i for i, segment in enumerate(segments) if segment), len(segments))
                segments = segments[first:]
            built[node] = "/".join([prefix, *segments] if prefix else segments)
        return built


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

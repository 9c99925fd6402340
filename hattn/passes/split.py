"""Split an FX graph at split ops: pieces (maximal runs of other nodes) and split-op calls, in original order.

    split_gm = split_graph(gm)

The returned GraphModule's top-level graph holds only: placeholders and get_attr nodes of the original graph (a
higher-order op's body, such as torch.cond's branches, is read by the piece that calls it, not passed in), one
`call_module` per piece (submodules "piece_0", "piece_1", ...; each returns a tuple), `getitem`s unpacking piece
outputs, the split-op calls (and getitems of their results) and the output node. Every original node lands in exactly
one place; pieces are never empty; two adjacent split ops have no piece between them. A `getitem` that unpacks a
piece's node (an int index, or any index of a tuple) joins that piece, so pieces never return nested tuples; one that
unpacks a split op's result stays in the top graph; any other indexing is a node of the piece where it stands.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from hattn.registry import split_op_of

TOP = -1  # partition of nodes that stay in the top-level graph


@dataclass
class SplitInfo:
    pieces: list[str]      # submodule names in execution order
    split_nodes: list[str]  # names of split-op nodes in execution order


def _unpacked(node: fx.Node, parts: dict[fx.Node, int], split_results: set[fx.Node]) -> fx.Node | None:
    """The node that `node` unpacks (`x[i]` with i an int, or any index of a tuple), where that is a piece's node or
    a split op's result; None for other indexing, e.g. of a placeholder (`inv_freq[None, :, None]`): a piece computes
    it like any node (so it is never left in the top graph after the piece that reads it)."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    src, index = node.args[0], node.args[1]
    if not isinstance(src, fx.Node) or not (parts.get(src, TOP) != TOP or src in split_results):
        return None
    value = src.meta.get("example_value", src.meta.get("val"))
    return src if isinstance(index, int) or isinstance(value, (tuple, list)) else None


def assign_partitions(graph: fx.Graph) -> dict[fx.Node, int]:
    """Map each node to its piece index, or TOP for nodes kept in the top-level graph."""
    parts: dict[fx.Node, int] = {}
    split_results: set[fx.Node] = set()  # split-op nodes and what unpacks them: they stay in the top graph
    piece, open_piece = -1, False
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            parts[node] = TOP
        elif split_op_of(node) is not None:
            parts[node], open_piece = TOP, False
            split_results.add(node)
        elif (src := _unpacked(node, parts, split_results)) is not None:
            parts[node] = parts[src]  # unpacking stays with what it unpacks
            if src in split_results:
                split_results.add(node)
        else:
            if not open_piece:
                piece, open_piece = piece + 1, True
            parts[node] = piece
    return parts


def _piece_module(root: fx.GraphModule, nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]):
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for inp in inputs:
        if _body(root, inp):  # a higher-order op's body is the piece's own attribute, not an input
            env[inp] = graph.node_copy(inp)
            continue
        env[inp] = graph.placeholder(inp.name)
        env[inp].meta = dict(inp.meta)
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(root, graph)


def _body(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` gets a submodule of `gm`: the body of a higher-order op such as torch.cond (a piece's compiler
    takes tensors as inputs, not modules)."""
    return node.op == "get_attr" and isinstance(operator.attrgetter(node.target)(gm), torch.nn.Module)


def _boundary(nodes: list[fx.Node], member: set[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """Inputs (defined outside, used inside) and outputs (defined inside, used outside) of a piece, in order."""
    inputs: dict[fx.Node, None] = {}
    for node in nodes:
        for inp in node.all_input_nodes:
            if inp not in member:
                inputs[inp] = None
    outputs = [n for n in nodes if any(user not in member for user in n.users)]
    return list(inputs), outputs


def split_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, SplitInfo]:
    """Split `gm` at its split ops. Returns the split GraphModule and the names of its pieces and split nodes."""
    parts = assign_partitions(gm.graph)
    by_piece: dict[int, list[fx.Node]] = {}
    for node, p in parts.items():
        if p != TOP:
            by_piece.setdefault(p, []).append(node)

    top = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, object] = {}  # what the top graph's get_attr / call_module nodes name
    info = SplitInfo([], [])
    for node in gm.graph.find_nodes(op="get_attr"):  # hoisted: a piece may use one defined after its start
        env[node] = top.node_copy(node)
        attrs[node.target] = operator.attrgetter(node.target)(gm)
    for node in gm.graph.nodes:
        p = parts[node]
        if node.op == "get_attr":
            continue
        if p == TOP:
            env[node] = top.node_copy(node, lambda n: env[n])
            if split_op_of(node) is not None:
                info.split_nodes.append(node.name)
        elif node is by_piece[p][0]:
            name = f"piece_{len(info.pieces)}"
            attrs[name] = _emit_piece(gm, top, env, by_piece[p], name)
            info.pieces.append(name)
    split_gm = fx.GraphModule(attrs, top)
    split_gm.graph.lint()
    return split_gm, info


def _emit_piece(gm, top: fx.Graph, env, nodes: list[fx.Node], name: str) -> fx.GraphModule:
    """Add the call of one piece (and getitems of its outputs) to the top graph; return the piece module."""
    inputs, outputs = _boundary(nodes, set(nodes))
    piece = _piece_module(gm, nodes, inputs, outputs)
    call = top.call_module(name, tuple(env[i] for i in inputs if not _body(gm, i)))
    for i, out in enumerate(outputs):
        env[out] = top.call_function(operator.getitem, (call, i))
        env[out].meta = dict(out.meta)
    return piece

"""Structural signatures of FX graphs: two graphs with one signature compile to the same code.

A signature hashes the graph's code with every node named by its position (the 24 layers' pieces differ only in
their placeholders' names, which Dynamo takes from each layer's parameters) and what a compiler specializes on for
each input: type, dtype, device, layout, shape, stride and storage offset (symbolic sizes by their expression),
requires_grad, whether Dynamo marked it static (parameters) and which earlier input shares its storage.

    signature(piece, fake_args)           # None: the piece must not share code (see `signature`)
    signature(dynamo_gm, examples, strict=False)   # always a string: the warm-start cache key's graph part
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.multiprocessing.reductions import StorageWeakRef

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter, FakeTensor)
_LEAVES = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


class _Opaque(Exception):
    """Something whose identity, not its structure, decides what it computes."""


def signature(gm: fx.GraphModule, inputs: Sequence, strict: bool = True) -> str | None:
    """sha256 (hex) of `gm`'s structure and its inputs' metadata.

    strict: None when the graph holds something a structural description cannot vouch for: a get_attr or
    call_module node (the attribute's identity matters), a locally defined function, an argument of another type
    than None/bool/int/float/str/dtype/device/layout/memory_format/slice and their containers, a tensor subclass.
    Not strict: those are described by their repr (for cache keys: a wrong match there costs a useless load, never
    wrong code, since torch checks its own cache keys again).
    """
    positions = {n: i for i, n in enumerate(gm.graph.nodes)}
    try:
        lines = [_node_line(n, positions, strict) for n in gm.graph.nodes]
        lines += _input_lines(gm.graph.find_nodes(op="placeholder"), inputs, strict)
    except _Opaque:
        return None
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _node_line(node: fx.Node, positions: dict[fx.Node, int], strict: bool) -> str:
    if strict and node.op in ("get_attr", "call_module"):
        raise _Opaque(node.format_node())
    if node.op == "placeholder":  # named after what Dynamo lifted (a layer's parameter): position only
        return f"{positions[node]} placeholder"
    target = node.target if isinstance(node.target, str) else _qualified(node.target, strict)
    args = fx.node.map_arg((node.args, node.kwargs), lambda n: _Position(positions[n]))
    return f"{positions[node]} {node.op} {target} {_describe(args, strict)}"


class _Position:
    def __init__(self, index: int):
        self.index = index

    def __repr__(self):
        return f"%{self.index}"


def _qualified(target, strict: bool) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"torch.ops.{target}"
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if strict and (qualname is None or "<" in qualname):  # <locals>, <lambda>: one name, maybe other code
        raise _Opaque(repr(target))
    return f"{module}.{qualname}" if qualname else repr(target)


def _describe(value, strict: bool) -> str:
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v, strict) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v, strict)}" for k, v in value.items()) + "}"
    if isinstance(value, slice):
        return f"slice({_describe((value.start, value.stop, value.step), strict)})"
    if isinstance(value, (_Position, *_LEAVES)) or value is Ellipsis:
        return repr(value)
    if strict:
        raise _Opaque(f"argument of type {type(value).__name__}")
    return repr(value)


def _input_lines(placeholders: list[fx.Node], inputs: Sequence, strict: bool) -> list[str]:
    storages: dict[StorageWeakRef, int] = {}
    lines = []
    for i, (node, x) in enumerate(zip(placeholders, inputs, strict=True)):
        static = bool(node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type"))
        lines.append(f"input {i} static={static} {_input(x, i, storages, strict)}")
    return lines


def _input(x, index: int, storages: dict, strict: bool) -> str:
    if isinstance(x, torch.SymInt):
        return f"SymInt {x.node.expr}"
    if not isinstance(x, torch.Tensor):
        return _describe(x, strict)
    described = (f"{type(x).__name__} {x.dtype} {x.device} {x.layout} shape={_sizes(x.shape)} "
                 f"stride={_sizes(x.stride())} offset={x.storage_offset()} grad={x.requires_grad}")
    if type(x) not in _PLAIN_TENSORS:  # a subclass (DTensor, ...): what it wraps is not described
        if strict:
            raise _Opaque(f"tensor subclass {type(x).__name__}")
        return described
    return f"{described} storage_of={storages.setdefault(StorageWeakRef(x.untyped_storage()), index)}"


def _sizes(sizes) -> str:
    return "(" + ", ".join(str(s) for s in sizes) + ")"

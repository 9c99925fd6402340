"""Run a split graph letting go of each value at its last use, inside pieces too (full and bcg captures).

The split graph's own code (FX's) clears a name only after the call that used it last returns, so a piece's inputs
stay alive while it runs. In a full-step capture that keeps the previous layer's input projection in the pool beside
the next layer's: the piece after a linear-attention op reads the gate `z`, a view of that projection, first, and
makes the next layer's projection later (32 MiB each at 2048 tokens for qwen3.5-1b). Here each value leaves the
environment before the call that uses it last, and a piece that can take its inputs boxed (`_Compiled.boxed`, in a
list it empties) gets them so: inductor's code then frees each input where it is last read.

Captures use it (full and bcg): a replay runs no Python, and graph-free steps keep the graph's faster generated code.
Boxed pieces are called without `nn.Module.__call__` and the graph's own forward does not run, so hooks on either
do not run (hattn sets none).
`HATTN_FREE_AT_LAST_USE=0` runs the graph's own code instead (the A/B of `scripts/pool_profile.py --freeing off,on`).
"""
from __future__ import annotations

import os

import torch.fx as fx


def run_freeing(gm: fx.GraphModule, *args):
    """gm(*args), each value released before the call that uses it last (pieces get their inputs boxed); any other
    callable is just called."""
    if not isinstance(gm, fx.GraphModule) or os.environ.get("HATTN_FREE_AT_LAST_USE", "1") == "0":
        return gm(*args)
    last_use: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        for used in node.all_input_nodes:
            last_use[used] = node
    released_at: dict[fx.Node, list[fx.Node]] = {}
    for value, user in last_use.items():
        released_at.setdefault(user, []).append(value)
    placeholders = len(gm.graph.find_nodes(op="placeholder"))
    if len(args) != placeholders:
        raise TypeError(f"the split graph takes {placeholders} inputs, got {len(args)}")
    env: dict[fx.Node, object] = {}
    inputs = iter(args)
    del args
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(inputs)
        elif node.op == "output":  # plain lists and dicts, as the graph's code returns (map_arg's are immutable)
            return _plain(fx.node.map_arg(node.args[0], env.__getitem__))
        elif node.op == "get_attr":
            env[node] = _attr(gm, node.target)
        elif node.op == "call_module" and not node.kwargs and (boxed := getattr(_attr(gm, node.target), "boxed", None)):
            piece_inputs = list(fx.node.map_arg(node.args, env.__getitem__))  # a piece's flat positional inputs
            _release(env, released_at.get(node, ()))
            env[node] = boxed(piece_inputs)  # empties piece_inputs: nothing here holds them while it runs
        else:
            call_args, call_kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            _release(env, released_at.get(node, ()))
            env[node] = _call(gm, node, call_args, call_kwargs)
            del call_args, call_kwargs
        if not node.users and node in env:  # a value nothing reads (a split op's None, say) goes at once
            del env[node]
    raise RuntimeError("the split graph has no output node")


def _plain(value):
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _release(env: dict, values) -> None:
    for value in values:
        del env[value]


def _call(gm: fx.GraphModule, node: fx.Node, args, kwargs):
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return _attr(gm, node.target)(*args, **kwargs)  # call_module


def _attr(gm: fx.GraphModule, target: str):
    value = gm
    for name in target.split("."):
        value = getattr(value, name)
    return value

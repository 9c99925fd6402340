"""Activation modules made once per name, not at every call of a forward.

transformers' `ACT2FN[name]` constructs a new module at every lookup, and some forwards look it up at every call: the
gated RMSNorms of Qwen3.5, Qwen3-Next, OLMo hybrid, Kimi-Linear and Ling (`ACT2FN[self.activation](gate)`). Eager,
that is a module construction per layer and step; under Dynamo the construction is traced (nn.Module.__init__ and
its dicts), on the qwen3.5-1b preset 40% of the bytecode Dynamo steps through (19.9k of 49.4k instructions, ~0.5 s
of a 6.7 s trace on the development CPU).

`share_activations(model)` gives each module whose class's forward reads the global `ACT2FN` a class whose forward is
the same code reading the global `_hattn_ACT2FN` instead, a `SharedActivations` put beside ACT2FN in the modeling
module: one module per name for activations without parameters or buffers, every other one made at each lookup as
before. The names the patched modules hold (`module.activation`) are made at once, so the table Dynamo guards on does
not change after a compile (a name first looked up later, e.g. by another model of the family, recompiles once).
"""
from __future__ import annotations

import dis
import types
from typing import Callable

import torch
import torch.nn as nn

SHARED = "_hattn_ACT2FN"  # the global the rebound forwards read


class SharedActivations:
    """`ACT2FN` with one module per name for stateless activations (see the module docstring)."""

    def __init__(self, table):
        self.table = table
        self.made: dict[str, nn.Module] = {}

    def __getitem__(self, name: str) -> nn.Module:
        act = self.made.get(name)
        if act is not None:
            return act
        act = self.table[name]
        # not while Dynamo traces: a store into this object would be a side effect replayed after every graph
        if not torch.compiler.is_compiling() and next(act.parameters(), None) is None \
                and next(act.buffers(), None) is None:
            self.made[name] = act
        return act

    def __getattr__(self, name: str):  # the rest of ACT2FN's dict interface (get, keys, ...) reads the table
        table = self.__dict__.get("table")
        if table is None:
            raise AttributeError(name)
        return getattr(table, name)

    def __contains__(self, name) -> bool:
        return name in self.table

    def __iter__(self):
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)


_REBOUND: dict[Callable, Callable] = {}  # HF forward -> the same code reading SHARED


def shared_forward(forward: Callable) -> Callable | None:
    """`forward` reading `SHARED` where it read transformers' ACT2FN, or None when it does not read it as a global."""
    from transformers.activations import ACT2FN

    code = getattr(forward, "__code__", None)
    if code is None or "ACT2FN" not in code.co_names or forward.__globals__.get("ACT2FN") is not ACT2FN:
        return None
    if any(i.argval == "ACT2FN" and i.opname != "LOAD_GLOBAL" for i in dis.get_instructions(code)):
        return None  # the name is also an attribute or a store: renaming it would change more than the lookup
    if forward not in _REBOUND:
        scope = forward.__globals__
        if not isinstance(scope.get(SHARED), SharedActivations):
            scope[SHARED] = SharedActivations(ACT2FN)
        names = tuple(SHARED if name == "ACT2FN" else name for name in code.co_names)
        rebound = types.FunctionType(code.replace(co_names=names), scope, forward.__name__, forward.__defaults__,
                                     forward.__closure__)
        rebound.__kwdefaults__, rebound.__qualname__ = forward.__kwdefaults__, forward.__qualname__
        rebound.__dict__.update(forward.__dict__)
        _REBOUND[forward] = rebound
    return _REBOUND[forward]


def share_activations(model: nn.Module, patched_class: Callable[[type, Callable], type]) -> int:
    """Give every module of `model` whose forward looks up ACT2FN a class with `shared_forward`; returns how many."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if hasattr(cls, "_hattn_base"):  # already hattn's class (a mixer with hattn's forward, or shared before)
            continue
        forward = shared_forward(cls.forward)
        if forward is None:
            continue
        module.__class__ = patched_class(cls, forward)
        if isinstance(getattr(module, "activation", None), str):
            forward.__globals__[SHARED][module.activation]  # made now, before any compile guards on the table
        count += 1
    return count

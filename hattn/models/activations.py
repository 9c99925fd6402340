"""Activation modules made once per name, not at every call of a forward.

transformers' `ACT2FN[name]` constructs a new module at every lookup, and some forwards look it up at every call: the
gated RMSNorms of Qwen3.5, Qwen3-Next, OLMo hybrid, Kimi-Linear and Ling (`ACT2FN[self.activation](gate)`). Eager,
that is a module construction per layer and step; under Dynamo the construction is traced (nn.Module.__init__ and
its dicts), on the qwen3.5-1b preset 40% of the bytecode Dynamo steps through (19.9k of 49.4k instructions, ~3 s
of a 7.4 s trace on the development CPU).

`share_activations(model)` gives each module whose class's forward reads `ACT2FN` a class whose forward is the same
code reading `SharedActivations` instead: one module per name for activations without parameters or buffers (made
at the first eager lookup: the adapter's probe makes them), every other one made at each lookup as before.
"""
from __future__ import annotations

import sys
import types
from typing import Callable

import torch
import torch.nn as nn


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


_REBOUND: dict[Callable, Callable] = {}  # HF forward -> the same code reading SharedActivations
_SCOPES: dict[str, types.ModuleType] = {}  # modeling module name -> a module of its globals with ACT2FN shared


def shared_forward(forward: Callable) -> Callable | None:
    """`forward` with `ACT2FN` read from a `SharedActivations`, or None when it does not read transformers' ACT2FN."""
    from transformers.activations import ACT2FN

    code = getattr(forward, "__code__", None)
    if code is None or "ACT2FN" not in code.co_names or forward.__globals__.get("ACT2FN") is not ACT2FN:
        return None
    if forward not in _REBOUND:
        scope = _scope(forward.__globals__, ACT2FN).__dict__
        rebound = types.FunctionType(code, scope, forward.__name__, forward.__defaults__, forward.__closure__)
        rebound.__kwdefaults__, rebound.__qualname__ = forward.__kwdefaults__, forward.__qualname__
        rebound.__dict__.update(forward.__dict__)
        _REBOUND[forward] = rebound
    return _REBOUND[forward]


def _scope(module_globals: dict, table) -> types.ModuleType:
    """A module holding a copy of a modeling module's globals, ACT2FN shared. It is a real module, in sys.modules
    under its own name: Dynamo finds a function's globals again by their `__name__`, so the copy must not keep the
    modeling module's (its guards would read the modeling module's ACT2FN)."""
    name = f"{__name__}.of.{module_globals['__name__']}"
    if name not in _SCOPES:
        scope = types.ModuleType(name)
        scope.__dict__.update({k: v for k, v in module_globals.items() if k not in ("__name__", "__spec__")})
        scope.ACT2FN = SharedActivations(table)
        _SCOPES[name] = sys.modules[name] = scope
    return _SCOPES[name]


def share_activations(model: nn.Module, patched_class: Callable[[type, Callable], type]) -> int:
    """Give every module of `model` whose forward looks up ACT2FN a class with `shared_forward`; returns how many."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if hasattr(cls, "_hattn_base"):  # already hattn's class (a mixer with hattn's forward, or shared before)
            continue
        forward = shared_forward(cls.forward)
        if forward is not None:
            module.__class__ = patched_class(cls, forward)
            count += 1
    return count

"""Steps of a compiled model without Dynamo's per-call work, once Dynamo has served their kind.

Each call of a torch.compile'd module evaluates Dynamo's guards (on the qwen3.5-1b preset ~400 us of host time: every
parameter, module attribute and global the forward read) and runs its generated code, which gathers every parameter
as a graph input (324 of them, ~130 us). A decode loop makes the same kind of call thousands of times, and at batch 1
the GPU waits for all of it. `Dispatch` calls the model through Dynamo the first time it sees a kind of call (the
forward arguments' shapes, strides, dtypes, devices and None-ness, the grad / inference / autocast modes), records
which of hattn's compiled graphs served it and with which arguments (`Traced`), and from then on calls that graph
itself: the parameters gathered once, the call's tensors and sizes put in their places.

What it relies on is the serving contract of a compiled model (vLLM's dispatcher relies on it too): after the first
calls, the model's code, module attributes and parameter metadata do not change. New weights are copied in place; a
parameter given new storage is still caught by the graph runtimes, which capture again. A kind whose call runs
Python around the graph keeps going through Dynamo at every call: a graph break or a resumed frame's graph, a
store into an object that existed before the call (unless it ends as it was), module hooks, a non-default Dynamo
stance, a graph that is not hattn's, or a result that is not the graph's output.
"""
from __future__ import annotations

import inspect
import logging
import weakref
from contextvars import ContextVar
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.modules.module as _hooks

enabled = True  # False: every call goes through Dynamo (A/B measurements, debugging)
MAX_KINDS = 1024  # kinds remembered per model; past it, new kinds go through Dynamo every time

log = logging.getLogger("hattn")
_CALLS: ContextVar[list | None] = ContextVar("hattn_traced_calls", default=None)
_VIA_DYNAMO = object()  # a kind that goes through Dynamo at every call


class Traced:
    """What hattn's backend hands Dynamo for one graph: the mode's runtime, noting each call (its arguments and
    result) while a `Dispatch` learns a kind. `sources`: Dynamo's sources of the graph's inputs, in order; `code`:
    the code object of the frame Dynamo traced, if the graph is all of it (no graph break, no side effect for
    Dynamo's code to replay after the graph), else None."""

    def __init__(self, fn: Callable, sources: list, code=None):
        self.fn, self.sources, self.code = fn, sources, code

    def __call__(self, *args):
        out = self.fn(*args)
        calls = _CALLS.get()
        if calls is not None:
            calls.append((self, args, out))
        return out

    def __getattr__(self, name: str):  # the runtime's attributes (stats, captured sizes, ...) read through
        return getattr(self.__dict__["fn"], name)


def input_sources(gm: fx.GraphModule) -> list:
    """Dynamo's source of each graph input (None for a graph not traced by Dynamo)."""
    return [getattr(n.meta.get("grapharg"), "source", None) for n in gm.graph.find_nodes(op="placeholder")]


def whole_frame(gm: fx.GraphModule):
    """The code object of the frame Dynamo is compiling `gm` for when `gm` is all that frame does: no graph break
    (Dynamo's code would run Python between graphs) and no side effect (attribute or global stores Dynamo's code
    replays after the graph). None otherwise, outside Dynamo, or where torch's internals differ (then every call of
    the model goes through Dynamo: slower, never wrong)."""
    if getattr(gm, "compile_subgraph_reason", None) is None:  # not compiled by Dynamo (a test, a direct call)
        return None
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        effects = tx.output.side_effects
        # objects made inside the frame (the graph's own tensors) may be mutated; objects that existed before
        # (module attributes, globals) must not be, or Dynamo's code stores into them after the graph
        changed = [v for v in effects.id_to_variable.values() if effects.is_modified(v)
                   and type(v.mutation_type).__name__ != "AttributeMutationNew" and not _restored(effects, v)]
        if gm.compile_subgraph_reason.graph_break or changed or effects.tensor_hooks:
            return None
        return tx.f_code
    except Exception as e:  # noqa: BLE001  (private API: any change means "not known to be whole")
        log.info("hattn: every call of this graph's model goes through Dynamo (its frame could not be checked: %r)",
                 e)
        return None


def _restored(effects, var) -> bool:
    """Whether every attribute the frame stores into the existing object `var` ends as the constant it holds now
    (a value set and reset inside the forward, as transformers' output-capturing context variable is): Dynamo's
    stores after the graph then change nothing, and a direct call may skip them."""
    obj, stores = getattr(var, "value", None), effects.store_attr_mutations.get(var)
    base_modified = getattr(var, "is_base_vt_modified", None)  # the object's __dict__ itself (newer torch)
    if obj is None or not stores or (base_modified is not None and base_modified(effects)):
        return False
    for name, final in stores.items():
        if not final.is_python_constant():
            return False
        missing = object()
        now, value = getattr(obj, name, missing), final.as_python_constant()
        if now is missing or not (now is value or (type(now) is type(value) and now == value)):
            return False
    return True


class _Direct:
    """One learned kind: the graph's inputs as Dynamo passed them, with the places the call's own tensors and sizes
    go (`plan`: (input index, forward argument index, size dim or None for the argument itself)). It holds its
    `Traced` weakly: once Dynamo lets go of the graph (`torch._dynamo.reset()`), so does this, and the graph's memory
    (its CUDA graphs and pool) is freed."""

    __slots__ = ("traced", "template", "plan", "single")

    def __init__(self, traced: Traced, template: list, plan: list, single: bool):
        self.traced, self.template, self.plan, self.single = weakref.ref(traced), template, plan, single

    def __call__(self, traced: Traced, args: tuple):
        inputs = list(self.template)
        for i, a, dim in self.plan:
            inputs[i] = args[a] if dim is None else args[a].shape[dim]
        out = traced.fn(*inputs)
        return out if self.single else out[0]


class Dispatch:
    """`Dispatch(compiled)(*args)` == `compiled(*args)` (positional forward arguments), without Dynamo after a kind's
    first call (see the module docstring). `direct_calls` counts the calls that skipped Dynamo."""

    def __init__(self, model: Callable):
        self.model = model
        self.module = getattr(model, "_orig_mod", None)
        forward = getattr(type(self.module), "forward", None)  # the function Dynamo traces (self first)
        self.code = getattr(forward, "__code__", None)
        names = _arg_names(forward)
        self.self_name, self.names = (names[0], names[1:]) if names and len(names) > 1 else (None, None)
        self.kinds: dict = {}
        self.direct_calls = 0

    def __call__(self, *args):
        key = _kind(args) if enabled and self.names is not None and self._plain() else None
        direct = self.kinds.get(key) if key is not None else _VIA_DYNAMO
        if direct is _VIA_DYNAMO:
            return self.model(*args)
        if direct is not None:
            traced = direct.traced()
            if traced is not None:
                self.direct_calls += 1
                return direct(traced, args)
            self.kinds.pop(key, None)  # Dynamo dropped the graph (torch._dynamo.reset): learn the kind again
        calls: list = []
        token = _CALLS.set(calls)
        try:
            out = self.model(*args)
        finally:
            _CALLS.reset(token)
        if len(self.kinds) < MAX_KINDS:
            self.kinds[key] = _learn(calls, args, out, self) or _VIA_DYNAMO
        return out

    def _plain(self) -> bool:
        """Nothing around the compiled frame that a direct call would skip: module hooks (run by `__call__` outside
        the frame) and a Dynamo stance other than the default (e.g. `force_eager`)."""
        m = self.module
        if m is None or m._forward_hooks or m._forward_pre_hooks or self.model._forward_hooks \
                or self.model._forward_pre_hooks:
            return False
        if _hooks._global_forward_hooks or _hooks._global_forward_pre_hooks:
            return False
        stance = getattr(torch._dynamo.eval_frame, "_stance", None)
        return stance is None or (stance.stance == "default" and not stance.skip_guard_eval_unsafe)


def _arg_names(forward) -> list[str] | None:
    """The forward's positional parameter names (self first), or None when it takes *args / **kwargs only."""
    if forward is None:
        return None
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in positional] or None


def _kind(args: tuple):
    """What Dynamo's guards on the call's own inputs depend on, as a dict key; None when an argument is neither a
    plain tensor (no subclass), None nor a plain int/bool/str (such a call always goes through Dynamo)."""
    key = [torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_default_dtype(),
           *(torch.get_autocast_dtype(d) if torch.is_autocast_enabled(d) else None for d in ("cuda", "cpu"))]
    for a in args:
        if type(a) is torch.Tensor:
            same = next(j for j, b in enumerate(args) if b is a)  # one tensor passed twice is another graph
            key.append((same, a.shape, a.stride(), a.storage_offset(), a.dtype, a.device, a.requires_grad,
                        torch._C._dispatch_keys(a).raw_repr()))
        elif a is None or type(a) in (int, bool, str):
            key.append((type(a), a))
        else:  # floats too: Dynamo may pass one as a 0-d tensor
            return None
    return tuple(key)


def _learn(calls: list, args: tuple, out, dispatch: Dispatch) -> _Direct | None:
    """The direct call of a kind from what Dynamo just did, or None when it cannot be replayed directly."""
    if len(calls) != 1:  # no hattn graph, or several (a graph break): Dynamo's code runs between them
        return None
    traced, inputs, result = calls[0]
    if traced.code is None or traced.code is not dispatch.code:
        return None  # a graph of another frame (a resumed one, another model's), or not all of the forward
    single = not isinstance(result, (tuple, list))
    if not (out is result if single else len(result) >= 1 and out is result[0]):
        return None  # the forward returned something built after the graph
    if len(traced.sources) != len(inputs):
        return None
    position = {name: i for i, name in enumerate(dispatch.names[:len(args)])}
    plan, template = [], list(inputs)
    for i, (source, value) in enumerate(zip(traced.sources, inputs)):
        where = _argument_place(source, position, dispatch.self_name)
        if where is False:
            return None  # derived from a forward argument in a way this does not replay
        if where is not None:
            a, dim = where
            seen = args[a] if dim is None else args[a].shape[dim]
            if not (seen is value or (type(seen) is type(value) is int and seen == value)):
                return None  # the graph input is not the argument (or its size) as it was passed
            plan.append((i, a, dim))
            template[i] = None  # not kept alive by the kind
        elif not isinstance(value, torch.Tensor) and value is not None and type(value) not in (int, float, bool):
            return None
    return _Direct(traced, template, plan, single)


def _argument_place(source, position: dict[str, int], self_name: str):
    """(forward argument index, size dim or None) of a graph input taken from a forward argument, None for module
    state or a global (the same object at every call), False for anything else (not replayed directly)."""
    from torch._dynamo.source import (GlobalSource, GlobalWeakRefSource, LocalSource, TensorProperty,
                                      TensorPropertySource)

    if isinstance(source, LocalSource) and source.local_name in position:
        return position[source.local_name], None
    if (isinstance(source, TensorPropertySource) and source.prop is TensorProperty.SIZE
            and isinstance(source.base, LocalSource) and source.base.local_name in position):
        return position[source.base.local_name], source.idx
    base = source
    while getattr(base, "base", None) is not None:
        base = base.base
    if isinstance(base, LocalSource) and base.local_name == self_name:
        return None  # the module's parameters, buffers and attributes
    if isinstance(base, (GlobalSource, GlobalWeakRefSource)):
        return None
    return False  # anything else may change from call to call


def dispatch_for(model: Callable) -> Callable:
    """The `Dispatch` of a torch.compile'd module (one per module, kept in its __dict__: it lives and dies with
    the module); any other model itself."""
    if not isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return model
    d = model.__dict__.get("_hattn_dispatch")
    if d is None:
        d = model.__dict__["_hattn_dispatch"] = Dispatch(model)
    return d

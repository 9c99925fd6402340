"""Steps of a compiled model without Dynamo's per-call work, once Dynamo has served their kind.

Each call of a torch.compile'd module evaluates Dynamo's guards (on the qwen3.5-1b preset ~400 us of host time: every
parameter, module attribute and global the forward read) and runs its generated code, which gathers every parameter
as a graph input (324 of them, ~130 us). A decode loop makes the same kind of call thousands of times, and at batch 1
the GPU waits for all of it. `Dispatch` calls the model through Dynamo the first time it sees a kind of call (the
forward arguments' shapes, strides, dtypes, devices and None-ness, the grad / inference / autocast modes), records
which of hattn's compiled graphs served it and with which arguments (`Traced`), and from then on calls that graph
itself: the parameters gathered once, the call's tensors and sizes put in their places.

What it relies on is the serving contract of a compiled model (vLLM's dispatcher relies on it too): after the first
calls, the model's code, module attributes, the globals its forward reads and parameter metadata (dtype, device) do not
change; a parameter frozen or unfrozen is seen with grad mode on (a walk over the parameters at each such call), where
it decides what a graph differentiates. New weights are copied in place; a parameter given new storage is still caught
by the graph runtimes, which capture again (one fused with others into one GEMM is an error naming the fix: the fused
graph reads its own buffer). A parameter or buffer assigned on any module (`load_state_dict(assign=True)`: new Parameter
objects) makes every Dispatch forget its kinds, as a train/eval switch does (torch's global registration hooks; its
kinds held the old objects, which went on serving silently before); one written into a module's `_parameters` /
`_buffers` dict directly (as `torch.func.functional_call` does) fires no such hook and is not seen. A hook added to or
removed from a submodule makes it forget its kinds too, and the calls it sends through Dynamo build hook guards (which
Dynamo skips by default: its cached graph would serve the old hooks). A kind whose call runs Python around the graph
keeps going through Dynamo at every call: a graph break or a resumed frame's graph, a store into an object that existed
before the call (unless it ends as it was), module hooks (backward ones too), a torch-function or dispatch mode, a
non-default Dynamo stance, a graph that is not hattn's, or a result that is not the graph's output. The module switched
between training and eval mode (`.train()`, `.eval()` on it) forgets its kinds: each is learned again through Dynamo,
which guards the mode.

One more kind skips Dynamo from its first call: a one-token call of a kind learned with a symbolic token count.
Dynamo would trace it as a graph of its own (it specializes sizes 0 and 1); the graph traced for every size serves
it, as vLLM's dispatcher serves batch 1 with its dynamic graph, when no shape guard of that graph rules size 1 out
(`one_token_dims`: a model that branches on the token count guards it, and then Dynamo traces size 1 as before).
Not detected: a branch Dynamo decides from the symbol's range (sizes >= 2) alone, `if T == 1` / `if T != 1`, which
leaves no guard; such a model runs its many-token branch at one token (as a step padded to two rows, and hattn's
size-1 graph captures of that graph, always did). `one_token_via_dynamic = False` turns this off.
"""
from __future__ import annotations

import inspect
import logging
import time
import weakref
from contextvars import ContextVar
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.modules.module as _hooks
from torch.utils.hooks import RemovableHandle

from hattn import registry
from hattn.compiler import snapshot
from hattn.counters import Stats, register

enabled = True  # False: every call goes through Dynamo (A/B measurements, debugging)
one_token_via_dynamic = True  # False: a one-token call is a kind of its own, traced by Dynamo (its size-1 graph)
MAX_KINDS = 1024  # kinds remembered per model; past it, new kinds go through Dynamo every time

log = logging.getLogger("hattn")
_CALLS: ContextVar[list | None] = ContextVar("hattn_traced_calls", default=None)
_VIA_DYNAMO = object()  # a kind that goes through Dynamo at every call
_ASSIGNED = [0]  # parameters and buffers assigned on any module (not a GraphModule), submodules on a served one
_SERVED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # the modules of models a Dispatch serves


def _assigned(module, name, value) -> None:
    """torch's global registration hook: a parameter or buffer set on a module (`load_state_dict(assign=True)`,
    `module.weight = nn.Parameter(...)`). The kinds a Dispatch learned hold the old objects; it forgets them (one
    int compare a call). Compiles building FX GraphModules do not count."""
    if not isinstance(module, fx.GraphModule):
        _ASSIGNED[0] += 1


def _submodule_assigned(module, name, value) -> None:
    """The same for a submodule set on a module of a served model (`model.norm = MyNorm()`, `mlp.act_fn =
    nn.Identity()`: the learned graphs run the old one). Only there: a forward slicing its ModuleList builds a new
    one, registering its layers, at every call; Dynamo, tracing such a forward, skips the rest (no guard on the set)."""
    if not torch.compiler.is_compiling() and module in _SERVED:
        _ASSIGNED[0] += 1


for _register in (_hooks.register_module_parameter_registration_hook, _hooks.register_module_buffer_registration_hook):
    _register(_assigned)
_hooks.register_module_module_registration_hook(_submodule_assigned)


class Traced:
    """What hattn's backend hands Dynamo for one graph: the mode's runtime, noting each call (its arguments and
    result) while a `Dispatch` learns a kind. `sources`: Dynamo's sources of the graph's inputs, in order; `code`:
    the code object of the frame Dynamo traced, if the graph is all of it (no graph break, no side effect for
    Dynamo's code to replay after the graph), else None."""

    def __init__(self, fn: Callable, sources: list, code=None, dynamic: list | None = None, graph=None):
        self.fn, self.sources, self.code = fn, sources, code
        self.dynamic = dynamic or [()] * len(sources)  # per graph input: the dims traced as symbolic sizes
        self.graph = graph  # snapshot.Graph: the pickled Dynamo graph a cache_dir's warm start reads, or None

    def __call__(self, *args):
        out = self.fn(*args)
        calls = _CALLS.get()
        if calls is not None:
            calls.append((self, args, out))
        return out

    def __getattr__(self, name: str):  # the runtime's attributes (stats, captured sizes, ...) read through
        return getattr(self.__dict__["fn"], name)


def learning() -> bool:
    """Whether a `Dispatch` is learning the kind of the call Dynamo is compiling a graph for (it may snapshot it)."""
    return _CALLS.get() is not None


def input_sources(gm: fx.GraphModule) -> list:
    """Dynamo's source of each graph input (None for a graph not traced by Dynamo)."""
    return [getattr(n.meta.get("grapharg"), "source", None) for n in gm.graph.find_nodes(op="placeholder")]


def symbolic_sizes(gm: fx.GraphModule) -> list[tuple]:
    """Per graph input, its (dim, SymInt) pairs as Dynamo traced them (read before passes change the inputs)."""
    values = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
    return [tuple((d, size) for d, size in enumerate(x.shape) if isinstance(size, torch.SymInt))
            if isinstance(x, torch.Tensor) else () for x in values]


def one_token_dims(sizes: list[tuple], shape_env) -> list[tuple[int, ...]]:
    """Per graph input (`symbolic_sizes`), the dims whose size may be 1 in this graph: a plain symbol that no guard
    pins (not replaced by a value or another expression) and every shape guard on it holds at 1 (Dynamo's own lower
    bound of 2 is a range, not a guard). A model that branches on the size (`if T > 2`) guards it: not such a dim.
    Call after everything that may add guards (inductor's compile of the pieces); none without a shape env."""
    import sympy

    if shape_env is None or not any(sizes):  # no symbolic size: no guard to read
        return [()] * len(sizes)
    replaced = dict(shape_env.replacements)  # symbols Dynamo unified (s80 -> s72: two inputs of one size)
    guards = [shape_env.replace(g.expr) for g in shape_env.guards]

    def holds_at_one(size) -> bool:
        sym = size.node.expr
        if not isinstance(sym, sympy.Symbol) or sym in replaced:
            return False
        return all(g.xreplace({sym: sympy.Integer(1)}) is sympy.true for g in guards if sym in g.free_symbols)

    return [tuple(d for d, size in dims if holds_at_one(size)) for dims in sizes]


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

    __slots__ = ("traced", "template", "plan", "single", "free", "pattern")

    def __init__(self, traced: Traced, template: list, plan: list, single: bool, free: dict, pattern: tuple):
        self.traced, self.template, self.plan, self.single = weakref.ref(traced), template, plan, single
        self.free = free  # forward argument index -> its dims traced as symbolic sizes
        self.pattern = pattern  # `_pattern` of the learning call with those dims: what a one-token call must match

    def __call__(self, traced: Traced, args: tuple):
        out = traced.fn(*_fill(self.template, self.plan, args))
        return out if self.single else out[0]


def _fill(template: list, plan: list, args: tuple) -> list:
    """A direct call's graph inputs: the template with the call's tensors and sizes in their places."""
    inputs = list(template)
    for i, a, dim in plan:
        inputs[i] = args[a] if dim is None else args[a].shape[dim]
    return inputs


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
        self._forget()

    def _forget(self) -> None:
        """What the kinds are learned under, taken now (at the start, and when the module's mode changed, a module
        got a new parameter, buffer or submodule, a submodule's hooks changed, or a split op was (un)registered:
        what was learned, kinds, snapshots matched under the old model key and graphs compiled from them, is not
        for the model as it is now)."""
        self.kinds.clear()
        # cache_dir's snapshots, read at the first call: [snapshot, its _Direct, None before it is compiled, False
        # when it cannot serve]; the graphs compiled from them; the model key ("" when the model has none)
        self.warm: list | None = None
        self.warm_traced: list = []
        self.model_key: str | None = None
        self.training = getattr(self.module, "training", None)  # the mode the kinds were learned in
        self.assigned = _ASSIGNED[0]  # the registrations the kinds were learned after
        self.registered = registry.generation()  # the split ops' registrations they were compiled under
        self.hooks = _SubmoduleHooks(self.module)  # the submodules' hooks they were learned with
        self.trainable = self._trainable()  # which parameters required grad (read with grad mode on only)
        self._serve()

    def _trainable(self) -> tuple[bool, ...]:
        """Which of the module's parameters require grad. Read only with grad mode on (a walk over every parameter):
        a graph compiled while none of them did differentiates none, so one unfrozen since is another kind (Dynamo
        guards requires_grad; the kinds do not hold it). Under no_grad and inference_mode it decides nothing."""
        if not torch.is_grad_enabled() or not isinstance(self.module, torch.nn.Module):
            return ()
        return tuple(p.requires_grad for p in self.module.parameters())

    def _serve(self) -> None:
        """Watch the model's modules as they are now for submodule assignments (`_submodule_assigned`)."""
        if isinstance(self.module, torch.nn.Module):
            _SERVED.update(self.module.modules())

    def __call__(self, *args):
        if (self.module is not None and self.module.training is not self.training) or _ASSIGNED[0] != self.assigned \
                or registry.generation() != self.registered or self.hooks.changed() \
                or (torch.is_grad_enabled() and self._trainable() != self.trainable):
            self._forget()
        key = _kind(args) if enabled and self.names is not None and self._plain() else None
        direct = self.kinds.get(key) if key is not None else _VIA_DYNAMO
        if direct is _VIA_DYNAMO:
            with _guarding_hooks():
                return self.model(*args)
        if direct is None and key is not None and one_token_via_dynamic:
            direct = self._dynamic_kind_for_one_token(key, args)
        if direct is None and key is not None:
            direct = self._snapshot_kind(key, args)
        if direct is not None:
            traced = direct.traced()
            if traced is not None:
                self.direct_calls += 1
                return direct(traced, args)
            self.kinds.pop(key, None)  # Dynamo dropped the graph (torch._dynamo.reset): learn the kind again
        calls: list = []
        token = _CALLS.set(calls)
        try:
            with _guarding_hooks():
                out = self.model(*args)
        finally:
            _CALLS.reset(token)
        learned = _learn(calls, args, out, self)
        if learned is not None and calls[0][0].graph is not None:
            self._save_snapshot(key, calls[0], args, learned)
        for traced, _, _ in calls:
            traced.graph = None  # a snapshot's record is kept for the first kind of its graph only
        if len(self.kinds) < MAX_KINDS:
            self.kinds[key] = learned or _VIA_DYNAMO
        return out

    # -- warm start without Dynamo (snapshot.py) --------------------------------------------------------------------
    def _cache_dir(self) -> str | None:
        """The model's cache_dir when it keeps snapshots; the model key computed at the first call, before anything
        compiled changed the model."""
        from hattn.compiler.backend import compiled_config

        config = compiled_config(self.model)
        if not snapshot.enabled or config is None or config.cache_dir is None or self.module is None:
            return None
        if self.model_key is None:
            self.model_key = snapshot.model_key(self.module) or ""
        return config.cache_dir if self.model_key else None

    def _snapshot_kind(self, key: tuple, args: tuple) -> _Direct | None:
        """The direct call of a saved snapshot that serves this call (compiled at the first such call), if any."""
        if self.warm is None:
            self.warm = []
            try:
                cache_dir = self._cache_dir()
                self.warm = [[snap, None] for snap in snapshot.load(cache_dir, self.model_key)] if cache_dir else []
            except Exception as e:  # noqa: BLE001  (an unreadable cache_dir: trace)
                log.warning("hattn: the warm-start snapshots could not be read (%r); Dynamo traces", e)
        for entry in self.warm:
            snap, direct = entry
            if direct is False or snap.modes != key[:_MODES] or snap.sizes(args, one_token_via_dynamic) is None:
                continue
            if direct is None:
                direct = entry[1] = self._compile_snapshot(entry, args)
                snap = entry[0]  # with the guards of the graph as compiled here
                if direct and snap.sizes(args, one_token_via_dynamic) is None:
                    log.info("hattn: a warm-start snapshot's graph gained a guard this call fails; Dynamo traces it")
                    continue
            elif not self._state_as_traced(snap, globals_only=True):  # a new kind: Dynamo checks its guards again
                continue
            if direct:
                if len(self.kinds) < MAX_KINDS:
                    self.kinds[key] = direct
                return direct
        return None

    def _compile_snapshot(self, entry: list, args: tuple) -> _Direct | bool:
        """Compile a snapshot's graph as the backend compiles Dynamo's, for this model; False when it cannot serve
        (a global or parameter not as saved, an error compiling it, a size its compile pinned). The entry's
        snapshot becomes the compiled one (its graph's guards as of this compile)."""
        from hattn.compiler.backend import compile_for

        snap, start = entry[0], time.perf_counter()
        if not self._state_as_traced(snap):
            log.info("hattn: a warm-start snapshot's guarded globals or module state differ here; Dynamo traces")
            return False
        compile_, built = compile_for(self.model), snapshot.graph_inputs(snap, self.module)
        if compile_ is None or built is None:
            log.info("hattn: a warm-start snapshot names parameters this model lacks; Dynamo traces")
            return False
        template, plan = built
        try:
            gm, fake_mode = snapshot.unpickle_graph(snap.graph)
            for node, desc in zip(gm.graph.find_nodes(op="placeholder"), snap.inputs, strict=True):
                node.meta["hattn_forward_arg"] = desc[0] == "arg"
            with snapshot.as_dynamo_compiles(), snapshot.specialized_floats(snap.floats):
                traced = compile_(gm, _fill(template, plan, args), fake_mode, time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001  (another torch's internals, a graph the passes refuse now: trace)
            log.warning("hattn: a warm-start snapshot could not be compiled (%r); Dynamo traces this call", e)
            return False
        compiled = snap.compiled(fake_mode.shape_env)
        if compiled is None:
            log.info("hattn: a warm-start snapshot's graph pinned a size when compiled here; Dynamo traces instead")
            return False
        entry[0] = compiled
        # Dynamo never saw this graph: the dispatcher holds it (torch._dynamo.reset() does not drop it)
        self.warm_traced.append(traced)
        return _Direct(traced, template, plan, snap.single, free={}, pattern=())

    def _state_as_traced(self, snap, globals_only: bool = False) -> bool:
        """Whether what Dynamo guarded of the module's state and globals (`globals_only`: of its globals) is as it
        was when the graph was traced."""
        return snap.guarded.match(type(self.module).forward.__globals__, self.self_name, self.module, globals_only)

    def _save_snapshot(self, key: tuple, call: tuple, args: tuple, direct: _Direct) -> None:
        """Write the snapshot of a kind just learned; a failure (a read-only or full disk) is logged, never raised:
        the call's result stands."""
        traced, inputs, _ = call
        start = time.perf_counter()
        try:
            cache_dir = self._cache_dir()
            if cache_dir is None:
                return
            snap = snapshot.make_snapshot(traced.graph, inputs, direct.plan, args, key[:_MODES], direct.single,
                                          self.module, traced.dynamic)
            if snap is not None:
                snapshot.save(cache_dir, self.model_key, snap)
        except Exception as e:  # noqa: BLE001
            log.warning("hattn: a warm-start snapshot could not be saved (%r)", e)
        register(Stats(snapshot_save_seconds=time.perf_counter() - start))

    def _dynamic_kind_for_one_token(self, key: tuple, args: tuple) -> _Direct | None:
        """A learned kind whose graph has a symbolic size at every dim where this call differs from it, each of
        them 1 in this call: Dynamo would trace size 1 as a graph of its own (it specializes sizes 0 and 1), but the
        graph traced for every size serves it (the graph runtimes replay their size-1 graphs, as a step padded to two
        rows did). Remembered as this call's kind."""
        for known_key, direct in list(self.kinds.items()):
            if (not isinstance(direct, _Direct) or not direct.free or known_key[:_MODES] != key[:_MODES]
                    or direct.traced() is None):
                continue
            if _pattern(args, direct.free, ones=True) == direct.pattern:
                if len(self.kinds) < MAX_KINDS:
                    self.kinds[key] = direct
                return direct
        return None

    def _plain(self) -> bool:
        """Nothing around the compiled frame that a direct call would skip: module hooks (run by `__call__` outside
        the frame; backward hooks too), a torch-function or dispatch mode, and a Dynamo stance other than the default
        (e.g. `force_eager`)."""
        m = self.module
        if m is None or _hooked(m) or _hooked(self.model):
            return False
        if _hooks._global_forward_hooks or _hooks._global_forward_pre_hooks or _hooks._global_backward_hooks \
                or _hooks._global_backward_pre_hooks:
            return False
        if torch._C._len_torch_function_stack():  # a TorchFunctionMode Dynamo would trace into the graph
            return False
        if _dispatch_modes():  # a TorchDispatchMode: Dynamo runs eager under it, a compiled kernel would bypass it
            return False
        stance = getattr(torch._dynamo.eval_frame, "_stance", None)
        return stance is None or (stance.stance == "default" and not stance.skip_guard_eval_unsafe)


def _guarding_hooks():
    """Dynamo guards the submodules' hooks of what it compiles here (by default it does not, and a hook registered
    after the first call is skipped by its cached graph too): with `_SubmoduleHooks`, a hook added or removed later
    gets a graph traced with it."""
    return torch._dynamo.config.patch(skip_nnmodule_hook_guards=False)


class _SubmoduleHooks:
    """The hooks on a module's submodules, as a kind was learned with them: Dynamo traces a submodule's hooks into
    the graph, so one added or removed later must send the call through Dynamo again (a steering hook added after
    the first generate was skipped, silently). Checked at every call: while no hook was registered anywhere in the
    process (`RemovableHandle.next_id`), only a removal can have changed them, from a dict that held hooks (adapt's
    own pre-hook on the base model: one dict); after any registration, their hook ids."""

    KINDS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

    def __init__(self, module):
        modules = module.modules() if isinstance(module, torch.nn.Module) else ()
        self.dicts = [getattr(m, kind) for m in modules for kind in self.KINDS]
        self._take()

    def _take(self) -> None:
        self.next_id, self.ids = RemovableHandle.next_id, self._ids()
        self.held = [d for d in self.dicts if d]

    def _ids(self) -> frozenset:
        return frozenset(i for d in self.dicts for i in d)

    def changed(self) -> bool:
        if RemovableHandle.next_id == self.next_id:
            return sum(map(len, self.held)) != len(self.ids)
        ids = self._ids()  # a hook registered somewhere: on these modules?
        if ids != self.ids:
            return True
        self._take()
        return False


def _hooked(m: torch.nn.Module) -> bool:  # attribute reads, not a loop: this runs at every step
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


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


_MODES = 5  # the key's leading entries: grad and inference modes, default dtype, autocast per device type


def _kind(args: tuple):
    """What Dynamo's guards on the call's own inputs depend on, as a dict key; None when an argument is neither a
    plain strided tensor (no subclass, not sparse), None nor a plain int/bool/str (such a call always goes through
    Dynamo)."""
    key = [torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_default_dtype(),
           *(torch.get_autocast_dtype(d) if torch.is_autocast_enabled(d) else None for d in ("cuda", "cpu"))]
    for a in args:
        if type(a) is torch.Tensor and a.layout is torch.strided:
            key.append(_tensor_entry(a, args))
        elif a is None or type(a) in (int, bool, str):
            key.append((type(a), a))
        else:  # floats too: Dynamo may pass one as a 0-d tensor
            return None
    return tuple(key)


def _pattern(args: tuple, free: dict, ones: bool = False) -> tuple | None:
    """The call's arguments as a kind, its symbolic-size dims (`free`) left out (a tensor with such dims: its strides
    as contiguity, which they follow); with `ones`, None unless every such dim is 1 and at least one is (a one-token
    call)."""
    out, saw_one = [], False
    for a, x in enumerate(args):
        if type(x) is not torch.Tensor:
            out.append((type(x), x))
            continue
        dims = free.get(a, ())
        if ones and (x.dim() <= max(dims, default=-1) or any(x.shape[d] != 1 for d in dims)):
            return None
        saw_one |= bool(dims)
        out.append(_tensor_entry(x, args, dims))
    return tuple(out) if saw_one or not ones else None


def _tensor_entry(x: torch.Tensor, args: tuple, dims: tuple = ()) -> tuple:
    """A tensor argument in a kind: which argument it first is (one tensor passed twice is another graph), shape,
    strides, offset, dtype, device, grad and dispatch keys; its `dims` left out of the shape, and then its strides
    as contiguity where they follow its sizes (any other layout must be the learned one exactly)."""
    same = next(j for j, b in enumerate(args) if b is x)
    shape, layout = x.shape, x.stride()
    if dims:
        shape = tuple(None if d in dims else size for d, size in enumerate(x.shape))
        layout = "contiguous" if x.is_contiguous() else layout
    return (same, shape, layout, x.storage_offset(), x.dtype, x.device, x.requires_grad,
            torch._C._dispatch_keys(x).raw_repr())


def _learn(calls: list, args: tuple, out, dispatch: Dispatch) -> _Direct | None:
    """The direct call of a kind from what Dynamo just did, or None when it cannot be replayed directly."""
    if len(calls) != 1:  # no hattn graph, or several (a graph break): Dynamo's code runs between them
        return _not_learned(f"{len(calls)} hattn graphs in one call (a graph break?)")
    traced, inputs, result = calls[0]
    if traced.code is None or traced.code is not dispatch.code:  # another frame's (resumed, another model's)
        return _not_learned("the graph is not the whole forward")
    single = not isinstance(result, (tuple, list))
    if not (out is result if single else len(result) >= 1 and out is result[0]):
        return _not_learned("the forward returned something built after the graph")
    if len(traced.sources) != len(inputs):
        return _not_learned("a graph input has no source")
    position = {name: i for i, name in enumerate(dispatch.names[:len(args)])}
    plan, template, free = [], list(inputs), {}
    for i, (source, value) in enumerate(zip(traced.sources, inputs)):
        where = _argument_place(source, position, dispatch.self_name)
        if where is False:
            return _not_learned(f"graph input {i} is derived from a forward argument ({source})")
        if where is not None:
            a, dim = where
            seen = args[a] if dim is None else args[a].shape[dim]
            if not (seen is value or (type(seen) is type(value) is int and seen == value)):
                return _not_learned(f"graph input {i} is not the forward argument as passed ({source})")
            plan.append((i, a, dim))
            template[i] = None  # not kept alive by the kind
            if dim is None and traced.dynamic[i] and all(args[a].shape[d] > 1 for d in traced.dynamic[i]):
                free[a] = traced.dynamic[i]
        elif not isinstance(value, torch.Tensor) and value is not None and type(value) not in (int, float, bool):
            return _not_learned(f"graph input {i} is a {type(value).__name__}")
    return _Direct(traced, template, plan, single, free, _pattern(args, free))


def _not_learned(reason: str) -> None:
    log.info("hattn: calls of this kind go through Dynamo: %s", reason)


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

"""Warm start without Dynamo: a learned kind's Dynamo graph kept in cache_dir and served by the next process.

torch's caches (artifacts.py) spare a warm start inductor's compiles, but Dynamo still traces the model in every
process (6-7 s of a 39 s warm start for the qwen3.5-1b preset on a 2-core CPU). So when `Dispatch` learns a kind of
call of a model compiled with a `cache_dir`, it also writes `cache_dir/dynamo/<model key>/<kind>-<code>.pkl`: Dynamo's
graph as the backend got it (torch's GraphPickler: nodes, fake-tensor metadata, the shape environment) and how to
rebuild the graph's inputs (the call's arguments and sizes; parameters and buffers by name; constants). A later
process's `Dispatch`, at a call no kind of it serves, looks there before calling Dynamo: a snapshot that matches the
call is compiled by hattn's backend as if Dynamo had handed it over, and serves this call and every later one it
matches.

Dynamo's guards never run for such a call, so what vouches for a snapshot is:
  - the model key: hattn's, torch's, transformers', triton's and Python's versions, Dynamo's config (without its
    path-like keys), torch's global flags, the device and rank, and every module of the model: the classes of its
    MRO (file digest and own attributes, of torch's and Python's own classes the functions set on them from outside
    their package: a method patched at run time is in no file), its attributes and hooks
    (functions by code, signature, defaults and closure; objects with the global names bound to them, six levels
    deep, deeper: no snapshot), its parameters' and buffers' names, shapes, dtypes and devices, and which of them
    are one tensor (tied weights);
  - the code: every file Dynamo traced a function of, hashed when saved and again when loaded;
  - the guarded values (`Guarded`): each guard Dynamo put on the forward's `self` or its module's globals, as its
    source expression and what its kind checks of the value, and which sources were one object; evaluated again
    when the snapshot is loaded, and the globals' again at every new kind it serves, as Dynamo would;
  - the call: grad/inference/autocast modes and default dtype, each argument's dtype, device, layout and static
    sizes as the dispatcher's kinds compare them (`_pattern`), the sizes Dynamo traced as symbols bound to the call's
    sizes, every shape guard of the graph (those inductor adds when this process compiles it included) true at those
    sizes, and size 1 only as the dispatcher serves it in-process (`one_token_via_dynamic`, every symbolic dim 1, each
    allowed by `dispatch.one_token_dims`);
  - the state: each parameter and buffer the graph reads, with the shape, strides, dtype and device it had.
No snapshot for a model whose attributes cannot be described the same way in another process, nor for a graph
whose guards read what another process cannot name (a forward parameter's default object, an instance whose
identity Dynamo checked, an object Dynamo holds by id) or that reads the environment (Dynamo guards a variable's
value only where it is set). Ops are described by name (their attributes fill in at first use). A snapshot that
does not match is skipped (Dynamo traces as before); one that cannot be read, compiled or written is logged and
skipped. `enabled = False` turns this off. A cache_dir holds pickles: load only one you trust.
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib
import json
import logging
import os
import pickle
import platform
import re
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

log = logging.getLogger("hattn")
enabled = True  # False: no snapshot is written or read (every process traces with Dynamo)
SNAPSHOTS = "dynamo"  # cache_dir/dynamo/<model key>/<kind>-<code>.pkl
FORMAT = 3
_DESCRIBE_DEPTH = 6
_LOWEST = 2  # Dynamo's lowest size for a symbol (it specializes 0 and 1)


class Opaque(ValueError):
    """A value the model key cannot describe the same way in another process."""


# -- what the backend keeps of a Dynamo graph ----------------------------------------------------------------------
@dataclass
class Graph:
    """What a compiled Dynamo graph offers a snapshot: its pickled form (before hattn's passes), the files Dynamo
    traced, what Dynamo guarded of the model's state and globals, the shape environment (read again when the kind
    is learned: compiling the pieces adds guards), each input's symbolic sizes ((dim, SymInt) pairs for a tensor,
    the SymInt for a size) and its example value, and the float symbols Dynamo specialized (`specialized_floats`)."""

    data: bytes
    files: dict[str, str]
    guarded: Guarded
    shape_env: object
    symbols: list
    values: list
    floats: tuple = ()


def keep_graph(gm: fx.GraphModule, example_inputs: list, sizes: list[tuple]) -> Graph | None:
    """The backend's record of Dynamo graph `gm` (its inputs' `dispatch.symbolic_sizes`) for a snapshot, or None:
    not traced by Dynamo, not picklable, or a guarded global it cannot describe."""
    from torch._dynamo.symbolic_convert import InstructionTranslator
    from torch._guards import TracingContext, detect_fake_mode

    tracing, fake_mode = TracingContext.try_get(), detect_fake_mode(example_inputs)
    codes = getattr(tracing, "traced_code", None)
    if not enabled or not codes or fake_mode is None or fake_mode.shape_env is None:
        return None
    start = time.perf_counter()
    try:
        tx = InstructionTranslator.current_tx()
        self_name = tx.f_code.co_varnames[0] if tx.f_code.co_argcount else None
        guarded = Guarded.of(tracing.guards_context.dynamo_guards, tx.f_globals, tx.f_locals, self_name)
        data = pickle_graph(gm)
        files = {f: file_digest(f) for f in sorted({c.co_filename for c in codes})}
    except Exception as e:  # noqa: BLE001  (torch's pickler covers most graphs, not all: then no snapshot)
        log.info("hattn: this graph gets no warm-start snapshot (%r)", e)
        return None
    values = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
    symbols = [v if isinstance(v, torch.SymInt) else dims for v, dims in zip(values, sizes, strict=True)]
    log.debug("hattn: graph pickled for its snapshot in %.2f s (%d bytes)", time.perf_counter() - start, len(data))
    return Graph(data, files, guarded, fake_mode.shape_env, symbols, values, _specialized_floats())


def _specialized_floats() -> tuple[str, ...]:
    """The float symbols (zf0, ...) Dynamo's trace of this frame specialized after a TensorifyScalarRestartAnalysis:
    AOTAutograd's tensorify pass, run on the graph again without that record, would ask Dynamo to restart."""
    from torch._dynamo.symbolic_convert import TensorifyState

    return tuple(sorted(getattr(TensorifyState, "force_specializations", ())))


@contextlib.contextmanager
def specialized_floats(names: tuple[str, ...]):
    """Compile a snapshot's graph with its trace's float specializations declared, as Dynamo's restarted trace
    compiled it (they are Dynamo's per-frame state, which a compile without Dynamo does not have)."""
    from torch._dynamo.symbolic_convert import TensorifyState

    before = set(TensorifyState.force_specializations)
    TensorifyState.force_specializations.update(names)
    try:
        yield
    finally:
        TensorifyState.force_specializations.clear()
        TensorifyState.force_specializations.update(before)


_META_KEPT = ("example_value", "val", "stack_trace")


def pickle_graph(gm: fx.GraphModule) -> bytes:
    """Dynamo's graph as bytes: nodes, their fake values and the shape environment; not Dynamo's `grapharg`s (they
    hold the real inputs), only the static-input flag of each input's tensor_dict (the piece signatures read it)."""
    from torch.fx._graph_pickler import Options

    saved = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        saved[node] = node.meta.get("tensor_dict")
        static = (saved[node] or {}).get("_dynamo_static_input_type")
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": static} if static else {}
    try:
        options = Options(ops_filter=None, node_metadata_key_filter=lambda k: k in (*_META_KEPT, "tensor_dict"))
        return _pickler().dumps(gm, options)
    finally:
        for node, value in saved.items():
            if value is None:
                node.meta.pop("tensor_dict", None)
            else:
                node.meta["tensor_dict"] = value


@contextlib.contextmanager
def as_dynamo_compiles():
    """The modes Dynamo compiles a frame's graph in: inference mode off (no_grad instead) and fakes made without
    inference-ness; else the pieces' fakes differ from the first process's, and so do torch's cache keys."""
    from torch._dynamo import utils

    with contextlib.ExitStack() as stack:
        for name in ("maybe_disable_inference_mode", "maybe_disable_inference_mode_for_fake_prop"):
            if hasattr(utils, name):
                stack.enter_context(getattr(utils, name)())
        yield


def renew_names(gm: fx.GraphModule) -> None:
    """Give the graph a namespace of its nodes' names only, as unpickling it builds: names of nodes Dynamo erased are
    free again. Done to every graph before the passes add nodes, so that a snapshot's pieces get the node names of
    the first process's, and with them torch's cache keys (AOTAutograd's hashes the code, names included)."""
    namespace = fx.graph._Namespace()
    for node in gm.graph.nodes:
        namespace.create_name(node.name, None)
    gm.graph._graph_namespace = namespace


def unpickle_graph(data: bytes):
    """(graph module, its fake mode) from `pickle_graph`'s bytes: fakes and symbols in a new shape environment."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    gm = _pickler().loads(data, fake_mode)
    gm.__dict__.pop("compile_subgraph_reason", None)  # Dynamo's note on the frame it was compiling then, not now
    return gm, fake_mode


@functools.cache
def _pickler() -> type:
    """torch's GraphPickler, describing a fake view's base without its fake mode (torch clears only the tensor's
    own, and a fake mode does not pickle). Built at first use (torch's pickler imports inductor: ~3 s); its classes
    live in this module, where unpickling finds them."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx import _graph_pickler as gp

    def without_fake_mode(desc):
        base = None if desc.base is None else without_fake_mode(desc.base)
        return dataclasses.replace(desc, fake_mode=None, base=base)

    class _TensorData(gp._TensorPickleData):
        def __init__(self, describer, t):
            super().__init__(describer, t)
            self.metadata = without_fake_mode(self.metadata)

    class _GraphPickler(gp.GraphPickler):
        def reducer_override(self, obj):
            if isinstance(obj, FakeTensor):
                return _TensorData.reduce_helper(self, obj)
            return super().reducer_override(obj)

    for cls in (_TensorData, _GraphPickler):
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls
    return _GraphPickler


# -- a snapshot ----------------------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """One learned kind, as written to cache_dir (see the module docstring)."""

    graph: bytes = field(repr=False)
    files: dict[str, str]            # file -> digest, of every file Dynamo traced a function of
    guarded: Guarded                 # what Dynamo checked of the module's state and globals
    inputs: list[tuple]              # per graph input: ("arg", a) | ("size", a, dim) | ("tensor", name, meta)
    #                                  | ("value", v): a forward argument, its size, a parameter or buffer, a constant
    single: bool                     # the forward returns the graph's only output (not output[0])
    modes: tuple                     # the dispatcher kind's leading entries (grad, inference, dtype, autocast)
    pattern: tuple                   # `_pattern` of the call with its symbolic dims left out
    dims: dict[int, tuple]           # forward argument -> its dims traced as symbols
    symbols: list[tuple]             # (argument, dim or None for an int argument, sympy symbol)
    guards: list                     # the graph's shape guards (sympy), replacements applied
    ranges: dict                     # symbol -> (lowest, highest or None)
    one_token: set = field(default_factory=set)  # (argument, dim) that may be 1
    floats: tuple = ()               # float symbols Dynamo specialized (`specialized_floats`)
    format: int = FORMAT

    def sizes(self, args: tuple, one_token: bool = True) -> dict | None:
        """The call's value of each symbol when this snapshot serves the call (kind, sizes, guards), else None.
        Size 1 as the dispatcher serves it in-process: `one_token` on, every symbolic size 1, each allowed."""
        try:
            return self._sizes(args, one_token)
        except Exception as e:  # noqa: BLE001  (a guard that cannot be evaluated at these sizes: x // (s - 1) at 1)
            log.info("hattn: a warm-start snapshot does not serve this call (%r)", e)
            return None

    def _sizes(self, args: tuple, one_token: bool) -> dict | None:
        from hattn.compiler.dispatch import _pattern

        if _pattern(args, self.dims) != self.pattern:
            return None
        values: dict = {}
        for a, d, sym in self.symbols:
            size = args[a] if d is None else args[a].shape[d]
            if values.setdefault(sym, size) != size:
                return None  # two sizes Dynamo traced as one symbol differ
        ones = [(a, d) for a, d, sym in self.symbols if values[sym] < self.ranges[sym][0]]
        if ones and not (one_token and all(v == 1 for v in values.values())
                         and all(place in self.one_token for place in ones)):
            return None
        for sym, size in values.items():
            high = self.ranges[sym][1]
            if size < 1 or (high is not None and size > high):
                return None
        return values if _hold(self.guards, values) else None

    def compiled(self, shape_env) -> Snapshot | None:
        """This snapshot with the guards of its graph as this process compiled it (inductor may add some), or None
        when the compile replaced a symbol the call binds (a size it pinned)."""
        if any(sym in shape_env.replacements for _, _, sym in self.symbols):
            return None
        return dataclasses.replace(self, guards=[shape_env.replace(g.expr) for g in shape_env.guards])


def _hold(guards: list, values: dict) -> bool:
    import sympy

    subs = {sym: sympy.Integer(v) for sym, v in values.items()}
    return all(g.xreplace(subs) is sympy.true for g in guards)


def make_snapshot(graph: Graph, inputs: list, plan: list, args: tuple, modes: tuple, single: bool,
                  module: torch.nn.Module, one_token: list) -> Snapshot | None:
    """The snapshot of a kind `Dispatch` just learned (its graph input values `inputs`, its `plan`), or None where one
    would not be exact: an input that is neither a forward argument, its size, a named parameter or buffer nor a
    plain constant; a symbolic size that is an expression or belongs to module state; a runtime assert."""
    import sympy

    from hattn.compiler.dispatch import _pattern

    env = graph.shape_env
    if getattr(env, "deferred_runtime_asserts", None) and any(env.deferred_runtime_asserts.values()):
        return _none("the graph has runtime asserts")
    names = _tensor_names(module)
    placed = {i: (a, dim) for i, a, dim in plan}
    described, symbols, dims, tokens = [], [], {}, set()
    for i, value in enumerate(inputs):
        sym_info = graph.symbols[i]
        if i in placed:
            a, dim = placed[i]
            described.append(("arg", a) if dim is None else ("size", a, dim))
            if isinstance(sym_info, torch.SymInt):  # an int argument, or an argument's size
                symbols.append((a, dim, env.replace(sym_info.node.expr)))
            elif sym_info:  # a tensor argument's symbolic dims
                dims[a] = tuple(d for d, _ in sym_info)
                for d, size in sym_info:
                    symbols.append((a, d, env.replace(size.node.expr)))
                    if d in one_token[i]:
                        tokens.add((a, d))
        elif isinstance(value, torch.Tensor):
            name = names.get(id(value))
            if name is None or sym_info:
                return _none(f"graph input {i} is module state that is not a named parameter or buffer, or of "
                             "symbolic size")
            traced = graph.values[i]  # its metadata when traced (fuse_linears has rebound it since)
            described.append(("tensor", name, tensor_meta(traced, type(value))))
        elif value is None or type(value) in (int, float, bool):
            described.append(("value", value))
        else:
            return _none(f"graph input {i} is a {type(value).__name__}, not a tensor or plain constant")
    expressions = [str(s) for _, _, s in symbols if not isinstance(s, sympy.Symbol)]
    if expressions:
        return _none("a symbolic size is an expression: " + ", ".join(expressions))
    guards = [env.replace(g.expr) for g in env.guards]
    bound = {s for _, _, s in symbols}
    if any(not g.free_symbols <= bound for g in guards):
        return _none("a guard names a symbol that is not an argument's size: " + ", ".join(
            str(g) for g in guards if not g.free_symbols <= bound))
    ranges = {}
    for s in bound:
        vr = env.var_to_range.get(s)
        ranges[s] = (_LOWEST, None) if vr is None else (_int_or_none(vr.lower) or _LOWEST, _int_or_none(vr.upper))
    return Snapshot(graph.data, graph.files, graph.guarded, described, single, modes, _pattern(args, dims), dims,
                    symbols, guards, ranges, tokens, graph.floats)


def _none(reason: str) -> None:
    log.info("hattn: no warm-start snapshot of this graph (%s): the next process traces it with Dynamo", reason)


def _int_or_none(bound) -> int | None:
    """A range bound as an int; None for an infinite one."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def tensor_meta(t: torch.Tensor, kind: type | None = None) -> tuple:
    """What a parameter or buffer input must be for a snapshot's graph (`kind`: its class, for a fake of it): what
    Dynamo's tensor guards check. Not its storage offset: a graph traced after fuse_linears rebound the weights to
    rows of one buffer is served as well by weights not fused yet, which its own fuse_linears pass then rebinds (the
    pieces compile from the traced fakes, offsets included: what the first process compiled, and cached)."""
    return (tuple(int(n) for n in t.shape), tuple(int(n) for n in t.stride()), str(t.dtype), str(t.device),
            t.requires_grad, (kind or type(t)).__name__)


def _named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def _tensor_names(module: torch.nn.Module) -> dict[int, str]:
    names = {}
    for name, t in _named_tensors(module):
        names.setdefault(id(t), name)
    return names


def graph_inputs(snap: Snapshot, module: torch.nn.Module) -> tuple[list, list] | None:
    """(template, plan) of the dispatcher's direct call, from the snapshot's inputs and this process's module; None
    when a parameter or buffer is missing or not as the snapshot saw it."""
    tensors = dict(_named_tensors(module))
    template, plan = [], []
    for i, desc in enumerate(snap.inputs):
        if desc[0] in ("arg", "size"):
            plan.append((i, desc[1], desc[2] if desc[0] == "size" else None))
            template.append(None)
        elif desc[0] == "tensor":
            t = tensors.get(desc[1])
            if t is None or tensor_meta(t) != desc[2]:
                log.info("hattn: a warm-start snapshot is not used: %s is %s, the snapshot's was %s", desc[1],
                         None if t is None else tensor_meta(t), desc[2])
                return None
            template.append(t)
        else:
            template.append(desc[1])
    return template, plan


# -- the values Dynamo guarded -------------------------------------------------------------------------------------
class _FrameGlobals(dict):
    """`G` of Dynamo's source expressions: the forward's module globals, and what Dynamo installs there while it
    traces (`__import_<module>` for a module, `__builtins_dict___<n>` for the builtins)."""

    def __missing__(self, name: str):
        if name.startswith("__import_"):
            return importlib.import_module(name[len("__import_"):].replace("_dot_", "."))
        if name.startswith("__builtins_dict__"):
            return builtins.__dict__
        raise KeyError(name)


@dataclass
class Guarded:
    """What Dynamo checked of the model's state and globals when it traced a graph, as plain data: for every guard
    whose source starts at the forward's `self` or its module's globals, (source expression, guard kind, what that
    kind checks of the value); which of those sources were one object (`identity`: each source with the first
    source of its object); which start at the globals; and torch's global flags."""

    values: list
    identity: list
    globals: list
    state: list

    @classmethod
    def of(cls, guards, frame_globals: dict, frame_locals: dict, self_name: str) -> Guarded:
        """Raises (no snapshot) when a guarded value cannot be evaluated or described, is an object whose identity
        Dynamo checked (ID_MATCH) but that another process cannot name (an instance), or is read from a forward
        parameter that is neither `self` nor what a dispatcher's kind describes (a default object, not passed)."""
        values, objects, roots = set(), {}, set()
        module = frame_locals.get(self_name)
        for guard in guards:
            kind = guard.create_fn_name()
            sources = [guard.originating_source]
            if kind == "DUPLICATE_INPUT":
                sources.append(guard.create_fn.keywords["source_b"])
            for source in sources:
                root = _root(source)
                expr = _expr(source, root, self_name, frame_globals, frame_locals)
                if expr is None:
                    continue  # a forward argument's: the kind (`_pattern`) says what it must be
                if kind == "HASATTR":  # Dynamo checks hasattr(base, member): the attribute may be absent
                    expr = _hasattr_expr(guard, source, root, self_name, frame_globals, frame_locals)
                value = _evaluate(expr, frame_globals, self_name, module)
                if value is os.environ or value is getattr(os.environ, "_data", None):
                    raise Opaque(f"the traced code reads the environment ({expr}): Dynamo guards a variable's "
                                 "value only where it was set, so another process's may differ unchecked")
                if kind == "ID_MATCH" and _instance_state(source) and not _named_identity(value):
                    raise Opaque(f"Dynamo checked the identity of {expr} (a {_qualname(type(value))})")
                if kind != "DUPLICATE_INPUT":
                    values.add((expr, kind, _plain(_guarded(kind, value))))
                if not _scalar(value):
                    objects[expr] = value
                if _is_global(root):
                    roots.add(expr)
        return cls(sorted(values), _identity(objects), sorted(roots), _global_state())

    def match(self, frame_globals: dict, self_name: str, module, globals_only: bool = False) -> bool:
        """Whether every guarded value is as it was, and the same sources are one object (logged when not).
        `globals_only` (a new kind of call, after a full match): the values read from the module's globals and
        torch's flags alone, compared with the objects the full match saw as Dynamo compares them within a process
        (identity, equality, lengths, keys): what may change between two calls of a compiled model; its own state
        is the serving contract's, as for every direct call."""
        if _global_state() != self.state:
            log.info("hattn: a warm-start snapshot is not used: torch's global flags are %s, they were %s",
                     _global_state(), self.state)
            return False
        seen = getattr(self, "_seen", None)
        if globals_only and seen is not None:
            return self._unchanged(seen, frame_globals, self_name, module)
        scope, objects, chosen = _scope(frame_globals, self_name, module), {}, set(self.globals)
        for expr, kind, described in self.values:
            if globals_only and expr not in chosen:
                continue
            try:
                value = eval(_code(expr), scope)  # noqa: S307
                now = _plain(_guarded(kind, value))
            except Exception as e:  # noqa: BLE001  (gone, or not describable now: not as it was)
                value, now = None, repr(e)
            if now != described:
                log.info("hattn: a warm-start snapshot is not used: %s (%s) is %s, it was %s", expr, kind, now,
                         described)
                return False
            objects[expr] = value
        identity = [(e, first) for e, first in self.identity if not globals_only or e in chosen]
        try:
            for expr, _ in identity:
                if expr not in objects:
                    objects[expr] = eval(_code(expr), scope)  # noqa: S307
        except Exception:  # noqa: BLE001
            return False
        same = _identity({e: objects[e] for e, _ in identity}) == _regrouped(identity)
        if not same:
            log.info("hattn: a warm-start snapshot is not used: its guarded objects are other objects' aliases now")
        elif not globals_only:
            self._seen = {e: objects[e] for e in self.globals if e in objects}  # for the next kinds' checks
        return same

    def _unchanged(self, seen: dict, frame_globals: dict, self_name: str, module) -> bool:
        """The globals' check at a new kind: each value is the object (or the equal scalar) the full match saw, its
        contents as they were where a guard reads them; an object made anew at each access (a bound method) as
        its guards describe it."""
        scope, described = _scope(frame_globals, self_name, module), {}
        for expr, kind, text in self.values:
            described.setdefault(expr, []).append((kind, text))
        for expr, before in seen.items():
            try:
                now = eval(_code(expr), scope)  # noqa: S307
                same = (type(now) is type(before) and now == before) if _scalar(before) else now is before
                checks = [(k, t) for k, t in described.get(expr, ()) if not same or k in _CONTENT_KINDS]
                same = (same or not _scalar(before)) and all(_plain(_guarded(k, now)) == t for k, t in checks)
            except Exception:  # noqa: BLE001
                same = False
            if not same:
                log.info("hattn: a warm-start snapshot does not serve this call: %s changed since", expr)
                return False
        return True


_CONTENT_KINDS = frozenset(("SEQUENCE_LENGTH", "DICT_KEYS_MATCH", "DICT_NOT_CONTAINS", "DICT_CONTAINS",
                            "NOT_PRESENT_IN_GENERIC_DICT", "HASATTR", "EMPTY_NN_MODULE_HOOKS_DICT"))


def _root(source):
    while getattr(source, "base", None) is not None:
        source = source.base
    return source


def _is_global(root) -> bool:
    from torch._dynamo.source import GlobalSource, GlobalWeakRefSource

    return isinstance(root, (GlobalSource, GlobalWeakRefSource))


def _expr(source, root, self_name: str, frame_globals: dict, frame_locals: dict) -> str | None:
    """The source's expression when it starts at the module's globals or at the forward's `self`; None for one
    that starts at a forward argument a dispatcher's kind describes (a tensor, None, an int, a bool, a str); Opaque
    for any other local (a parameter's default object). A global Dynamo installed under an object's id (`_<id>_c0`)
    is named by the module it holds; any other such object has no name another process knows (Opaque)."""
    from torch._dynamo.source import LocalSource

    name = source.name
    expr = name() if callable(name) else name
    if isinstance(root, LocalSource) and root.local_name != self_name:
        value = frame_locals.get(root.local_name)
        if value is None or type(value) in (torch.Tensor, int, bool, str):
            return None
        raise Opaque(f"Dynamo guarded {expr}, read from a forward parameter's {_qualname(type(value))}")
    if not (_is_global(root) or isinstance(root, LocalSource)):
        return None
    global_name = getattr(root, "global_name", None)
    if global_name is not None and _BY_ID.fullmatch(global_name):
        held = frame_globals.get(global_name)
        if not isinstance(held, types.ModuleType):
            raise Opaque(f"Dynamo guarded {expr}, a {_qualname(type(held))} it holds by id")
        stable = "__import_" + held.__name__.replace(".", "_dot_")
        expr = expr.replace(f"G['{global_name}']", f"G['{stable}']")
    return expr


_BY_ID = re.compile(r"_\d+_c\d+")


def _hasattr_expr(guard, source, root, self_name: str, frame_globals: dict, frame_locals: dict) -> str:
    """`hasattr(<object>, '<name>')` of a HASATTR guard. torch 2.13 gives the object's source and the name as the
    guard's `attr`; torch 2.11 the attribute's source (which cannot be read when `hasattr` was False in the
    traced code: transformers asks `hasattr(config, ...)` of attributes a config may lack)."""
    attr = getattr(guard.create_fn, "keywords", {}).get("attr")
    while attr is None and not hasattr(source, "member") and getattr(source, "base", None) is not None:
        source = source.base  # an NNModuleSource around the attribute's source
    base, attr = (source, attr) if attr is not None else (source.base, source.member)
    return f"hasattr({_expr(base, root, self_name, frame_globals, frame_locals)}, {attr!r})"


def _evaluate(expr: str, frame_globals: dict, self_name: str, module):
    """A Dynamo source expression's value now (`G`: the frame's globals; `L`: the forward's `self`)."""
    return eval(_code(expr), _scope(frame_globals, self_name, module))  # noqa: S307


def _scope(frame_globals: dict, self_name: str, module) -> dict:
    """What Dynamo's source expressions are evaluated in, as its guard code evaluates them."""
    from torch._dynamo import guards

    helpers = guards._get_closure_vars() if hasattr(guards, "_get_closure_vars") else getattr(
        guards, "CLOSURE_VARS", {})
    return {**helpers, "G": _FrameGlobals(frame_globals), "L": {self_name: module}, "__builtins__": builtins}


@functools.lru_cache(maxsize=65536)
def _code(expr: str):
    return compile(expr, "<dynamo source>", "eval")


def _regrouped(identity: list) -> list:
    """A recorded identity partition restricted to some of its sources, each with the first of those in its group."""
    first: dict[str, str] = {}
    return [(expr, first.setdefault(group, expr)) for expr, group in identity]


def _guarded(kind: str, value):
    """What a guard of `kind` checks of `value`, as plain data."""
    if kind in ("SEQUENCE_LENGTH", "EMPTY_NN_MODULE_HOOKS_DICT"):
        return len(value)
    if kind == "DICT_KEYS_MATCH":  # in order: a traced loop over the dict follows it
        return [repr(k) for k in value.keys()]
    if kind in ("DICT_NOT_CONTAINS", "DICT_CONTAINS"):
        return sorted(repr(k) for k in value.keys())
    if kind in ("NOT_PRESENT_IN_GENERIC_DICT", "HASATTR") and hasattr(value, "__dict__"):
        return [_qualname(type(value)), sorted(vars(value))]
    if kind == "TENSOR_MATCH" and isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), str(value.dtype), str(value.device), value.requires_grad]
    if kind == "TYPE_MATCH":
        return _describe(type(value), 1, {}, False)
    if kind == "ID_MATCH" and not _scalar(value) and _global_names(value):
        return ["named", _qualname(type(value)), _global_names(value)]
    return _describe(value, 1, {}, False)


def _plain(described) -> str:
    return json.dumps(described, sort_keys=True, default=str)


def _scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device))


def _named_identity(value) -> bool:
    """Whether another process's object of the same name is this one's counterpart (a module, class, function,
    enum member, singleton, or an object its class's module binds to a name), so that Dynamo's identity check on it
    can be checked again by that name (`_guarded` describes such an object by it)."""
    named = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.BuiltinMethodType,
             types.MethodType, enum.Enum, torch.dtype, torch.device, functools.partial)
    return (_scalar(value) or value is Ellipsis or value is NotImplemented or isinstance(value, named)
            or bool(_global_names(value)))


def _global_names(value) -> list[str]:
    """The names the module of `value`'s class binds to `value` itself (`FAST = Mode()`)."""
    home = sys.modules.get(getattr(type(value), "__module__", ""), None)
    return sorted(k for k, v in vars(home).items() if v is value) if home is not None else []


def _instance_state(source) -> bool:
    """Whether a source reads a model instance's own state (`self.mode`), not class-level or import-time state (a
    class attribute, a method's closure, a module global): for the latter, the object at the same path in another
    process is the counterpart of this one."""
    while source is not None:
        if type(source).__name__ in ("TypeSource", "TypeDictSource", "TypeMROSource", "ClosureSource",
                                     "CellContentsSource", "DefaultsSource", "GlobalSource", "GlobalWeakRefSource"):
            return False
        source = getattr(source, "base", None)
    return True


def _identity(objects: dict) -> list:
    """(source, the first source of its object) for each source, in order: which sources were one object."""
    first: dict[int, str] = {}
    return [(expr, first.setdefault(id(value), expr)) for expr, value in sorted(objects.items())]


# -- the model key -------------------------------------------------------------------------------------------------
def model_key(module: torch.nn.Module) -> str | None:
    """The digest of what the model's Dynamo graphs depend on besides the call (see the module docstring); None when
    something in it cannot be described the same way in another process (logged)."""
    from hattn.compiler.artifacts import _version, hattn_version

    memo: dict = {}
    config = torch._dynamo.config
    ignored = set(getattr(config, "_compile_ignored_keys", ()))  # paths, verbosity: as torch's own config hash
    try:
        fields = {
            "format": FORMAT,
            "versions": [hattn_version(), torch.__version__, _version("transformers"), _version("triton"),
                         platform.python_version()],
            "dynamo": _describe({k: v for k, v in config.get_config_copy().items() if k not in ignored}, 2, memo,
                                False),
            "globals": _global_state(),
            "where": _placement(module),
            "modules": [(name, _module_fields(m, memo)) for name, m in module.named_modules(remove_duplicate=False)],
            "tied": _tied(module),
        }
    except Exception as e:  # noqa: BLE001  (Opaque, or an attribute whose repr fails: no snapshots, never a crash)
        log.info("hattn: this model gets no warm-start snapshots: %r", e)
        return None
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _placement(module: torch.nn.Module) -> list:
    """The device the model is on (name and capability: a model may branch on them while traced) and, in a
    distributed run, this rank and the world size (each rank traces its own graph)."""
    from hattn.compiler.artifacts import device_name

    dist = torch.distributed
    ranks = [dist.get_rank(), dist.get_world_size()] if dist.is_available() and dist.is_initialized() else None
    return [device_name(list(module.parameters())[:1]), ranks]


def _global_state() -> list:
    return [torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision(),
            str(torch.get_default_device()), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.enabled]


def _tied(module: torch.nn.Module) -> list:
    """Each parameter or buffer name that is another name's tensor (tied weights: one graph input), with that name."""
    first: dict[int, str] = {}
    return [(name, first[id(t)]) for name, t in _named_tensors(module) if first.setdefault(id(t), name) != name]


_STATE = frozenset(("_parameters", "_buffers", "_modules"))  # described apart; every other attribute, hooks included


def _module_fields(m: torch.nn.Module, memo: dict) -> list:
    tensors = [(kind, name, None if t is None else [list(t.shape), str(t.dtype), str(t.device), t.requires_grad,
                                                     type(t).__name__])
               for kind, d in (("p", m._parameters), ("b", m._buffers)) for name, t in d.items()]
    attrs = {k: _describe(list(v.values()) if "hooks" in k and isinstance(v, dict) else v, _DESCRIBE_DEPTH, memo)
             for k, v in m.__dict__.items() if k not in _STATE}  # a hook dict's keys are process-wide counters
    return [_class_fields(type(m), memo), sorted(m._modules), tensors, attrs]


def _class_fields(cls: type, memo: dict) -> list:
    """Each class of the MRO: its name, its file's digest and its own attributes (a flag or a method set at run
    time, as a patching library does, is in no file)."""
    return [_describe(c, 2, memo, False) for c in cls.__mro__ if c is not object]


_VERSIONED = frozenset(("builtins", "torch", "typing", "collections", "abc", "enum", "dataclasses"))
_CLASS_SKIPPED = frozenset(("__dict__", "__weakref__", "__doc__", "__module__", "__qualname__", "__annotations__",
                            "__annotate__", "__firstlineno__", "__static_attributes__"))


def _class_attributes(cls: type, depth: int, memo: dict, package: str | None = None) -> list:
    """The class's own attributes; with `package` (the directory of a versioned package's sources), only its
    functions whose code lies outside that directory (set on the class at run time)."""
    out = []
    for name, v in vars(cls).items():
        if name in _CLASS_SKIPPED:
            continue
        if isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        elif isinstance(v, property):
            v = (v.fget, v.fset, v.fdel)
        if package is None or _defined_outside(v, package):
            out.append([name, _describe(v, depth, memo, False)])
    return out


def _defined_outside(v, package: str) -> bool:
    """Whether a class attribute is (or holds) a Python function whose code is not in `package`'s directory."""
    functions = v if isinstance(v, tuple) else (v,)
    files = [getattr(getattr(f, "__code__", None), "co_filename", None) for f in functions]
    return any(f is not None and not os.path.abspath(f).startswith(package) for f in files)


@functools.lru_cache(maxsize=None)
def _package_dir(cls: type) -> str:
    """The directory of the sources of `cls`'s top-level package (a built-in one has none: nothing is outside)."""
    top = sys.modules.get(cls.__module__.split(".")[0])
    file = getattr(top, "__file__", None)
    return os.path.dirname(os.path.abspath(file)) + os.sep if file else ""


def _class_file_digest(cls: type) -> str | None:
    import inspect

    try:
        file = inspect.getsourcefile(cls)
    except (TypeError, OSError):
        return None
    return file_digest(file) if file else None


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _describe(v, depth: int, memo: dict, strict: bool = True):
    """A value as plain data for the key: scalars and strings as they are; containers item by item; tensors by
    metadata; modules, classes and builtins by name; functions by code, defaults and closure; other objects (a
    config) by class and attributes, `depth` levels deep. Raises Opaque for what only has an address to show, and,
    when `strict` (a module's attributes), for an object with attributes past `depth`; else such an object is its
    class and attribute names (a class's attributes, a function's closure)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (torch.dtype, torch.device, torch.Size, enum.Enum, bytes, range, slice, complex)):
        return repr(v)
    if isinstance(v, torch.Tensor):
        return ["tensor", list(v.shape), str(v.dtype), str(v.device)]
    if isinstance(v, torch.nn.Module):
        return ["module", _qualname(type(v))]  # its own fields are the key's entry for it
    if isinstance(v, types.ModuleType):
        return ["python module", v.__name__]
    if isinstance(v, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):  # by name: their attributes fill lazily
        return ["op", _qualname(type(v)), str(v)]
    if isinstance(v, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return ["builtin", _qualname(v)]
    key = (id(v), depth, strict)  # the memo holds `v`: its id is not reused by another object while the key is made
    if key in memo:
        return memo[key][1]
    memo[key] = (v, [_qualname(type(v))])  # what a reference cycle back to `v` reads
    memo[key] = (v, _describe_new(v, depth, memo, strict))
    return memo[key][1]


def _describe_new(v, depth: int, memo: dict, strict: bool):
    inner = max(depth - 1, 0)
    if isinstance(v, type):  # by name and file, and (within depth) by its own attributes; of torch's and Python's
        # own classes only the functions set from outside their package: their versions are in the key, and Dynamo
        # patches nn.Module at its first compile, but a user's `nn.Linear.forward = ...` is in neither
        versioned = v.__module__.split(".")[0] in _VERSIONED
        attrs = (_class_attributes(v, inner, memo, _package_dir(v) if versioned else None) if depth else [])
        return ["class", _qualname(v), _class_file_digest(v), attrs]
    if isinstance(v, (list, tuple)):
        return [_describe(x, inner, memo, strict) for x in v]
    if isinstance(v, (set, frozenset)):
        return sorted((_describe(x, inner, memo, strict) for x in v), key=repr)
    if isinstance(v, dict):
        return [[repr(k), _describe(x, inner, memo, strict)] for k, x in v.items()]
    if isinstance(v, functools.partial):
        return ["partial", _describe(v.func, depth, memo), _describe(v.args, depth, memo, strict),
                _describe(v.keywords, depth, memo, strict)]
    if isinstance(v, (types.FunctionType, types.MethodType)):
        fn = getattr(v, "__func__", v)
        cells = [c.cell_contents for c in fn.__closure__ or () if _filled(c)]
        return ["function", _qualname(fn), _code_digest(fn.__code__), _describe(fn.__defaults__, depth, memo, False),
                _describe(fn.__kwdefaults__, depth, memo, False), _describe(cells, depth, memo, False),
                _describe(getattr(v, "__self__", None), inner, memo, False)]
    if hasattr(v, "__dict__"):
        # not a stored hash (GenerationConfig's _original_object_hash): Python salts str hashes per process
        attrs = {k: x for k, x in vars(v).items() if not k.endswith("_hash")}
        if attrs and not depth:
            if strict:
                raise Opaque(f"a {_qualname(type(v))} lies deeper than the key describes")
            return [_qualname(type(v)), sorted(attrs)]
        # the names its class's module binds it to: `self.mode is FAST` tells FAST from an equal SLOW
        return [_qualname(type(v)), {k: _describe(x, inner, memo, strict) for k, x in attrs.items()},
                _global_names(v)]
    text = repr(v)
    if " at 0x" in text:
        if strict:
            raise Opaque(f"a {_qualname(type(v))} shows only its address ({text[:80]})")
        return [_qualname(type(v))]
    return [_qualname(type(v)), text]


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True


def _code_digest(code: types.CodeType) -> str:
    """A code object's digest from its bytecode, names and constants (not marshal's bytes: they depend on reference
    counts)."""
    digest = hashlib.sha256(code.co_code)
    for part in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars, code.co_flags,
                 code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount):
        digest.update(repr(part).encode())
    for const in code.co_consts:
        digest.update(_const_text(const).encode())
    return digest.hexdigest()[:16]


def _const_text(const) -> str:
    if isinstance(const, types.CodeType):
        return _code_digest(const)
    if isinstance(const, frozenset):  # `x in {...}` compiles to one: its order follows the salted hashes
        return "frozenset(" + ", ".join(sorted(_const_text(c) for c in const)) + ")"
    if isinstance(const, tuple):
        return "(" + ", ".join(_const_text(c) for c in const) + ")"
    return repr(const)


def file_digest(path: str) -> str | None:
    """A file's content digest (cached by path, size and modification time), None when it cannot be read."""
    try:
        st = os.stat(path)
        return _digest(path, st.st_size, st.st_mtime_ns)
    except OSError:
        return None


@functools.lru_cache(maxsize=4096)
def _digest(path: str, size: int, mtime: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# -- the files -----------------------------------------------------------------------------------------------------
def directory(cache_dir: str, key: str) -> Path:
    return Path(cache_dir) / SNAPSHOTS / key


def save(cache_dir: str, key: str, snap: Snapshot) -> Path | None:
    """Write the snapshot unless this kind's is there for the same traced code; returns the file written, or None.
    (A snapshot of code since changed has another name: it never stands in the way of its successor.)"""
    kind = hashlib.sha256(repr((snap.modes, snap.pattern)).encode()).hexdigest()[:16]
    code = hashlib.sha256(repr(sorted(snap.files.items())).encode()).hexdigest()[:8]
    path = directory(cache_dir, key) / f"{kind}-{code}.pkl"
    if path.is_file():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(pickle.dumps(snap))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("hattn: saved a warm-start snapshot of a Dynamo graph to %s", path)
    return path


def load(cache_dir: str, key: str) -> list[Snapshot]:
    """The snapshots of this model key whose traced files are unchanged (a file that cannot be read is logged)."""
    out = []
    folder = directory(cache_dir, key)
    for path in sorted(folder.glob("*.pkl")) if folder.is_dir() else []:
        try:
            snap = pickle.loads(path.read_bytes())
        except Exception as e:  # noqa: BLE001  (a torn or foreign file: trace instead)
            log.warning("hattn: the warm-start snapshot %s could not be read (%r); Dynamo traces instead", path, e)
            continue
        if not isinstance(snap, Snapshot) or snap.format != FORMAT:
            continue
        changed = [f for f, digest in snap.files.items() if file_digest(f) != digest]
        if changed:
            log.info("hattn: the warm-start snapshot %s is not used: %s changed since it was saved", path, changed[0])
            continue
        out.append(snap)
    return out

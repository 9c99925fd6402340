"""Warm start without Dynamo: a learned kind's Dynamo graph kept in cache_dir and served by the next process.

torch's caches (artifacts.py) spare a warm start inductor's compiles, but Dynamo still traces the model in every
process (7 s of a 46 s warm start for the qwen3.5-1b preset on a 2-core CPU). So when `Dispatch` learns a kind of call
of a model compiled with a `cache_dir`, it also writes `cache_dir/dynamo/<model key>/<kind>.pkl`: Dynamo's graph
as the backend got it (torch's GraphPickler: nodes, fake-tensor metadata, the shape environment) and how to rebuild
the graph's inputs (the call's arguments and sizes; parameters and buffers by name; constants). A later process's
`Dispatch`, at a call no kind of it serves, looks there before calling Dynamo: a snapshot that matches the call is
compiled by hattn's backend as if Dynamo had handed it over, and serves this call and every later one it matches.

Dynamo's guards never run for such a call, so what vouches for a snapshot is:
  - the model key: hattn's, torch's, transformers', triton's and Python's versions, the compile options, Dynamo's
    config, torch's global flags, and every module of the model: its class (and the digest of the file defining each
    class of its MRO), its plain attributes (values; objects described three levels deep; a config as its dict),
    its parameters' and buffers' names, shapes, dtypes and devices;
  - the code: every file Dynamo traced a function of while building the graph, hashed when saved and again when
    loaded (a changed file: the snapshot is not used);
  - the call: grad/inference/autocast modes and default dtype, each argument's dtype, device, layout and static
    sizes as the dispatcher's kinds compare them (`_pattern`), the sizes Dynamo traced as symbols bound to the call's
    sizes, every shape guard of the graph (those inductor added when the pieces compiled included) true at those
    sizes, and a size of 1 only where the graph's one-token dims allow it (`dispatch.one_token_dims`);
  - the state: each parameter and buffer the graph reads, with the shape, strides, offset, dtype and device it had.
Not covered, as for the dispatcher's direct calls: a forward that reads a global of a file Dynamo traced no function
of. A snapshot that does not match is skipped (Dynamo traces as before); one that cannot be read or compiled is logged
and skipped. `enabled = False` turns this off.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import json
import logging
import marshal
import os
import pickle
import platform
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

log = logging.getLogger("hattn")
enabled = True  # False: no snapshot is written or read (every process traces with Dynamo)
SNAPSHOTS = "dynamo"  # cache_dir/dynamo/<model key>/<kind>.pkl
FORMAT = 1
_DESCRIBE_DEPTH = 3


# -- what the backend keeps of a Dynamo graph ----------------------------------------------------------------------
@dataclass
class Graph:
    """What a compiled Dynamo graph offers a snapshot: its pickled form (before hattn's passes), the files Dynamo
    traced, the shape environment (read again when the kind is learned: compiling the pieces adds guards), each
    input's symbolic sizes ((dim, SymInt) pairs for a tensor, the SymInt itself for a size) and example value."""

    data: bytes
    files: dict[str, str]
    shape_env: object
    symbols: list
    values: list  # each input's example value (fake) as traced


def keep_graph(gm: fx.GraphModule, example_inputs: list) -> Graph | None:
    """The backend's record of Dynamo graph `gm` for a snapshot, or None (not traced by Dynamo, or not picklable)."""
    from torch._guards import TracingContext, detect_fake_mode

    tracing = TracingContext.try_get()
    fake_mode = detect_fake_mode(example_inputs)
    codes = getattr(tracing, "traced_code", None)
    if not enabled or not codes or fake_mode is None or fake_mode.shape_env is None:
        return None
    start = time.perf_counter()
    try:
        data = pickle_graph(gm)
        files = {f: file_digest(f) for f in sorted({c.co_filename for c in codes})}
    except Exception as e:  # noqa: BLE001  (torch's pickler covers most graphs, not all: then no snapshot)
        log.info("hattn: this graph gets no warm-start snapshot (it could not be pickled: %r)", e)
        return None
    values = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
    symbols = [tuple((d, s) for d, s in enumerate(v.shape) if isinstance(s, torch.SymInt))
               if isinstance(v, torch.Tensor) else v if isinstance(v, torch.SymInt) else () for v in values]
    log.debug("hattn: graph pickled for its snapshot in %.2f s (%d bytes)", time.perf_counter() - start, len(data))
    return Graph(data, files, fake_mode.shape_env, symbols, values)


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
    inputs: list[tuple]              # per graph input: ("arg", a) | ("size", a, dim) | ("tensor", name, meta)
    #                                  | ("value", v): a forward argument, its size, a parameter or buffer, a constant
    single: bool                     # the forward returns the graph's only output (not output[0])
    modes: tuple                     # the dispatcher kind's leading entries (grad, inference, dtype, autocast)
    pattern: tuple                   # `_pattern` of the call with its symbolic dims left out
    dims: dict[int, tuple]           # forward argument -> its dims traced as symbols
    symbols: list[tuple]             # (argument, dim, sympy symbol)
    guards: list                     # the graph's shape guards (sympy), replacements applied
    ranges: dict                     # symbol -> (lowest, highest or None)
    one_token: set = field(default_factory=set)  # (argument, dim) that may be 1
    torch_version: str = torch.__version__
    format: int = FORMAT

    def sizes(self, args: tuple) -> dict | None:
        """The call's value of each symbol, when this snapshot serves the call (kind, sizes, guards); else None."""
        from hattn.compiler.dispatch import _pattern

        if _pattern(args, self.dims) != self.pattern:
            return None
        values: dict = {}
        for a, d, sym in self.symbols:
            size = args[a].shape[d]
            if values.setdefault(sym, size) != size:
                return None  # two sizes Dynamo traced as one symbol differ
        for (a, d, sym) in self.symbols:
            size, (low, high) = values[sym], self.ranges.get(sym, (2, None))
            if size < 1 or (high is not None and size > high) or (size < low and (a, d) not in self.one_token):
                return None
        return values if _hold(self.guards, values) else None


def guards_hold(shape_env, snap: Snapshot, args: tuple) -> bool:
    """Whether every shape guard of `shape_env` (a snapshot's graph after this process compiled it: the guards the
    compile added included) holds at the call's sizes."""
    values = snap.sizes(args)
    return values is not None and _hold([shape_env.replace(g.expr) for g in shape_env.guards], values)


def _hold(guards: list, values: dict) -> bool:
    import sympy

    subs = {sym: sympy.Integer(v) for sym, v in values.items()}
    return all(g.xreplace(subs) is sympy.true for g in guards)


def make_snapshot(graph: Graph, inputs: list, plan: list, args: tuple, modes: tuple, single: bool,
                  module: torch.nn.Module, one_token: list) -> Snapshot | None:
    """The snapshot of a kind `Dispatch` just learned (its graph input values `inputs`, its `plan`), or None where one
    would not be exact: an input that is neither a forward argument, its size, a named parameter or buffer nor a
    plain constant; a symbolic size that is an expression or belongs to module state; a runtime assert."""
    from hattn.compiler.dispatch import _pattern

    env = graph.shape_env
    if getattr(env, "deferred_runtime_asserts", None) and any(env.deferred_runtime_asserts.values()):
        return None
    names = _tensor_names(module)
    placed = {i: (a, dim) for i, a, dim in plan}
    described, symbols, dims, tokens = [], [], {}, set()
    for i, value in enumerate(inputs):
        sym_info = graph.symbols[i]
        if i in placed:
            a, dim = placed[i]
            if dim is None:
                described.append(("arg", a))
                pairs = sym_info if isinstance(value, torch.Tensor) else ()
                dims[a] = tuple(d for d, _ in pairs)
                for d, size in pairs:
                    symbols.append((a, d, env.replace(size.node.expr)))
                    if d in one_token[i]:
                        tokens.add((a, d))
            else:
                described.append(("size", a, dim))
                if isinstance(sym_info, torch.SymInt):
                    symbols.append((a, dim, env.replace(sym_info.node.expr)))
        elif isinstance(value, torch.Tensor):
            name = names.get(id(value))
            if name is None or sym_info:
                return None  # module state that is not a named parameter or buffer, or of symbolic size
            traced = graph.values[i]  # its metadata when traced (fuse_linears has rebound it since)
            described.append(("tensor", name, tensor_meta(traced, type(value))))
        elif value is None or type(value) in (int, float, bool):
            described.append(("value", value))
        else:
            return None
    import sympy

    if any(not isinstance(s, sympy.Symbol) for _, _, s in symbols):
        return None
    guards = [env.replace(g.expr) for g in env.guards]
    bound = {s for _, _, s in symbols}
    if any(not g.free_symbols <= bound for g in guards):
        return None
    ranges = {}
    for s in bound:
        vr = env.var_to_range.get(s)
        ranges[s] = (2, None) if vr is None else (_int_or_none(vr.lower) or 2, _int_or_none(vr.upper))
    return Snapshot(graph.data, graph.files, described, single, modes, _pattern(args, dims), dims, symbols, guards,
                    ranges, tokens)


def _int_or_none(bound) -> int | None:
    """A range bound as an int; None for an infinite one."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def tensor_meta(t: torch.Tensor, kind: type | None = None) -> tuple:
    """What a parameter or buffer input must be for a snapshot's graph (`kind`: its class, for a fake of it): what
    Dynamo's tensor guards check. Not its storage offset: a graph traced after fuse_linears rebound the weights to
    rows of one buffer is served as well by weights not fused yet, which its own fuse_linears pass then rebinds."""
    return (tuple(int(n) for n in t.shape), tuple(int(n) for n in t.stride()), str(t.dtype), str(t.device),
            t.requires_grad, (kind or type(t)).__name__)


def _tensor_names(module: torch.nn.Module) -> dict[int, str]:
    names = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), name)
    return names


def graph_inputs(snap: Snapshot, module: torch.nn.Module) -> tuple[list, list] | None:
    """(template, plan) of the dispatcher's direct call, from the snapshot's inputs and this process's module; None
    when a parameter or buffer is missing or not as the snapshot saw it."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    template, plan = [], []
    for i, desc in enumerate(snap.inputs):
        if desc[0] == "arg":
            plan.append((i, desc[1], None))
            template.append(None)
        elif desc[0] == "size":
            plan.append((i, desc[1], desc[2]))
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


# -- the model key -------------------------------------------------------------------------------------------------
def model_key(module: torch.nn.Module, config) -> str:
    """The digest of what the model's Dynamo graphs depend on besides the call (see the module docstring)."""
    from hattn.compiler.artifacts import _version, hattn_version

    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("cache_dir", "progress")}
    memo: dict = {}
    fields = {
        "format": FORMAT,
        "versions": [hattn_version(), torch.__version__, _version("transformers"), _version("triton"),
                     platform.python_version()],
        "options": options,
        "dynamo": _describe(torch._dynamo.config.get_config_copy(), 1, memo),  # not get_hash: it pickles sets
        "globals": _global_state(),
        "where": _placement(module),
        "modules": [(name, _module_fields(m, memo)) for name, m in module.named_modules(remove_duplicate=False)],
    }
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


_MODULE_INTERNALS = frozenset(torch.nn.Module().__dict__) - {"training"}


def _module_fields(m: torch.nn.Module, memo: dict) -> list:
    cls = type(m)
    tensors = [(kind, name, None if t is None else [list(t.shape), str(t.dtype), str(t.device), t.requires_grad,
                                                     type(t).__name__])
               for kind, d in (("p", m._parameters), ("b", m._buffers)) for name, t in d.items()]
    attrs = {k: _describe(v, _DESCRIBE_DEPTH, memo) for k, v in m.__dict__.items() if k not in _MODULE_INTERNALS}
    return [_class_fields(cls), sorted(m._modules), tensors, attrs]


@functools.cache
def _class_fields(cls: type) -> list:
    return [(f"{c.__module__}.{c.__qualname__}", _class_file_digest(c)) for c in cls.__mro__ if c is not object]


def _class_file_digest(cls: type) -> str | None:
    import inspect

    try:
        file = inspect.getsourcefile(cls)
    except (TypeError, OSError):
        return None
    return file_digest(file) if file else None


def _describe(v, depth: int, memo: dict):
    """A value as plain data for the key: scalars and strings as they are, containers item by item, tensors by
    metadata, functions by their code, other objects (a config) by class and attributes, `depth` levels deep."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (torch.dtype, torch.device, torch.Size, enum.Enum, bytes)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return [_describe(x, depth, memo) for x in v]
    if isinstance(v, (set, frozenset)):
        return sorted((_describe(x, depth, memo) for x in v), key=repr)
    if isinstance(v, dict):
        return [[repr(k), _describe(x, depth, memo)] for k, x in v.items()]
    if isinstance(v, torch.Tensor):
        return ["tensor", list(v.shape), str(v.dtype), str(v.device)]
    if isinstance(v, torch.nn.Module):
        return ["module", f"{type(v).__module__}.{type(v).__qualname__}"]
    if isinstance(v, (types.FunctionType, types.MethodType)):
        fn = getattr(v, "__func__", v)
        return ["function", f"{fn.__module__}.{fn.__qualname__}", _code_digest(fn.__code__)]
    if id(v) in memo:
        return memo[id(v)]
    name = f"{type(v).__module__}.{type(v).__qualname__}"
    memo[id(v)] = [name]  # what a reference cycle back to `v` reads
    if depth > 0 and hasattr(v, "__dict__"):  # a transformers config: every field, private ones included
        # not a stored hash (GenerationConfig's _original_object_hash): Python salts str hashes per process
        memo[id(v)] = [name, {k: _describe(x, depth - 1, memo) for k, x in vars(v).items()
                              if not k.endswith("_hash")}]
    return memo[id(v)]


def _code_digest(code: types.CodeType) -> str:
    try:
        return hashlib.sha256(marshal.dumps(code)).hexdigest()[:16]
    except ValueError:
        return code.co_qualname


def file_digest(path: str) -> str | None:
    """A file's content digest (cached by path, size and modification time), None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _digest(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _digest(path: str, size: int, mtime: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# -- the files -----------------------------------------------------------------------------------------------------
def directory(cache_dir: str, key: str) -> Path:
    return Path(cache_dir) / SNAPSHOTS / key


def save(cache_dir: str, key: str, snap: Snapshot) -> Path | None:
    """Write the snapshot unless one of its kind is there; returns the file written, or None."""
    name = hashlib.sha256(repr((snap.modes, snap.pattern)).encode()).hexdigest()[:24]
    path = directory(cache_dir, key) / f"{name}.pkl"
    if path.is_file():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps(snap))
    os.replace(tmp, path)
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
        if not isinstance(snap, Snapshot) or snap.format != FORMAT or snap.torch_version != torch.__version__:
            continue
        changed = [f for f, digest in snap.files.items() if file_digest(f) != digest]
        if changed:
            log.info("hattn: the warm-start snapshot %s is not used: %s changed since it was saved", path, changed[0])
            continue
        out.append(snap)
    return out

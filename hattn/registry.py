"""The registry: the one place that knows what a split op is, and what a mode is.

A *split op* is a `torch.library` custom op with a *kind* ("full", "linear", or a user kind such as "mamba").
The registry answers, and nothing else in hattn answers:

- is this FX node / callable a split op? (every split op runs outside piecewise and breakable graphs)
                                                     -> `split_op_of(target)`
- is this call attention or a mixer that is *not* a registered split op (it must never be captured)?
                                                     -> `unregistered_mixer(target)`
- which kind serves layer `layer_id`?                -> `check_route(kind, layer_id, layer_kinds)`
- which modes exist, and how each builds its runtime -> `modes()`, `mode(name)` (runtime modules register them)

Routing is by kind and layer id only, never by a module's class or a flag on it: peers that decided "is this layer
linear attention?" from a class attribute routed layers to the wrong backend. At run time the kind checked against the
model's layer table is the one the op's implementation passes to `context.op_context`; the registered kind is what
the adapter's probe checks each layer calls (`hattn.models.hf.probe`). An op should pass its registered kind.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class SplitOp:
    """A registered split op: its overload packet (what Dynamo graphs hold) and its kind."""

    packet: torch._ops.OpOverloadPacket
    kind: str
    capture_safe: bool = False  # may run inside a single CUDA graph (`mode="full"`)
    direct: Callable | None = None  # the op's implementation, a plain function of the same signature (see direct_call)
    prepare: Callable | None = None  # (*args, **kwargs) -> runner(ctx) -> bool, or None (see register_split_op)
    strided_inputs: bool = False  # its kernels read any strides of its tensor arguments (see reads_input_layout)

    @property
    def name(self) -> str:
        return self.packet._qualified_op_name  # e.g. "hattn::full_attention"


_LOCK = threading.Lock()
_OPS: dict[str, SplitOp] = {}  # qualified name -> SplitOp
_GENERATION = [0]  # bumped by every (un)registration: a compiled graph rechecks its ops when it changed


class RegistryError(ValueError):
    """A split op was registered or routed in a way that could give wrong results."""


class UnregisteredAttentionError(RuntimeError):
    """A graph holds an attention/mixer call that is not a registered split op."""


def _packet_of(op) -> torch._ops.OpOverloadPacket:
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op
    if isinstance(op, torch._ops.OpOverload):
        return op.overloadpacket
    if isinstance(op, str) and "::" in op:
        ns, name = op.split("::", 1)
        try:
            return getattr(getattr(torch.ops, ns), name.split(".")[0])
        except (AttributeError, RuntimeError) as e:
            raise RegistryError(f"no custom op {op!r} is defined (define it with torch.library.custom_op or "
                                f"torch.library.define before registering it): {e}") from None
    if hasattr(op, "_opoverload"):  # torch.library.custom_op's CustomOpDef
        return op._opoverload.overloadpacket
    raise RegistryError(
        f"{op!r} is not a torch custom op. Define it with torch.library.custom_op (or torch.library.define) "
        f"and pass torch.ops.<ns>.<name> to register_split_op."
    )


def register_split_op(op, kind: str, *, capture_safe: bool = False, direct: Callable | None = None,
                      prepare: Callable | None = None, strided_inputs: bool = False) -> SplitOp:
    """Register a custom op as a split op of `kind`.

    `op` is `torch.ops.ns.name`, one of its overloads, the object `torch.library.custom_op` returned, or the
    string "ns::name". Registering the same op again with the same kind replaces its flags (capture_safe, direct,
    prepare) for graphs compiled from then on; with another kind, it is an error.
    `capture_safe=True` declares that the op's kernels keep fixed addresses and never sync with the host, so
    `mode="full"` may capture it inside one graph. `direct` is the op's implementation as a plain Python function
    (the same for every device): graph runtimes then call it between graphs without the dispatcher (see
    `direct_call`). `prepare(*args, **kwargs)` serves a runtime that calls the op again and again with the same
    arguments (bcg's replays of its recorded calls, pcg's call sites): it returns None (not served), or a runner:
    `runner(ctx)` does the call for that step's forward context (checks and planning done once, when it first
    serves a context like it) and returns True, or returns False, and the runtime calls the op. A runner may only
    be faster, never different: same kernels, same results. Only ops that return nothing are prepared. `direct`
    and `prepare` serve the op's default overload (what `torch.ops.ns.name(...)` calls); its other overloads
    (`.out`, ...) go through the dispatcher. `strided_inputs=True` declares that the op's kernels honour any strides
    of its tensor arguments, so hattn's passes may hand it a view where eager would give a contiguous tensor (a
    column slice of a fused GEMM's output); by default it gets the layout it gets in eager (`reads_input_layout`).
    """
    if not isinstance(kind, str) or not kind.isidentifier():
        raise RegistryError(f"split-op kind must be an identifier string such as 'mamba', got {kind!r}")
    for name, flag in (("capture_safe", capture_safe), ("strided_inputs", strided_inputs)):
        if not isinstance(flag, bool):
            raise RegistryError(f"{name} must be True or False, got {flag!r}")
    for name, fn in (("direct", direct), ("prepare", prepare)):
        if fn is not None and not callable(fn):
            raise RegistryError(f"{name}= must be a function (see register_split_op), got {fn!r}")
    packet = _packet_of(op)
    entry = SplitOp(packet, kind, capture_safe, direct, prepare, strided_inputs)
    with _LOCK:
        old = _OPS.get(entry.name)
        if old is not None and old.kind != kind:
            raise RegistryError(
                f"{entry.name} is already a split op of kind {old.kind!r}; it cannot also be {kind!r}. "
                f"Call unregister_split_op first if you mean to change it."
            )
        _OPS[entry.name] = entry
        _GENERATION[0] += 1
    return entry


def unregister_split_op(op) -> None:
    """Forget a split op (tests and users replacing a registration)."""
    with _LOCK:
        _OPS.pop(_packet_of(op)._qualified_op_name, None)
        _GENERATION[0] += 1


def generation() -> int:
    """A number that changes whenever a split op is registered or unregistered."""
    return _GENERATION[0]


def returns_nothing(target) -> bool:
    """Whether a split op (an overload, or a packet with a default overload) returns nothing: it writes its output
    in place, so a `prepare` runner may serve it (nothing returned for later graphs to read)."""
    overload = target if isinstance(target, torch._ops.OpOverload) else getattr(target, "default", None)
    return overload is not None and not overload._schema.returns


def split_op_of(target) -> SplitOp | None:
    """The split op an FX node (or its target) calls, or None.

    Matches the `OpOverloadPacket` (what Dynamo graphs hold) and any of its `OpOverload`s (what AOT graphs hold).
    """
    if isinstance(target, torch.fx.Node):
        if target.op != "call_function":
            return None
        target = target.target
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if not isinstance(target, torch._ops.OpOverloadPacket):
        return None
    return _OPS.get(target._qualified_op_name)


def serves_overload(target) -> bool:
    """Whether a split op's `direct` and `prepare` serve `target`: its packet (what Dynamo's graphs hold) or its
    default overload. Another overload (`.out`, or any other schema of the op) has code of its own: it is called
    through the dispatcher."""
    return not isinstance(target, torch._ops.OpOverload) or target._overloadname == "default"


def prepare_of(target) -> Callable | None:
    """The `prepare` of the split op `target` calls, where it serves that overload (`serves_overload`)."""
    op = split_op_of(target)
    return op.prepare if op is not None and serves_overload(target) else None


def direct_call(target) -> Callable:
    """What a runtime calls for `target` when it runs eagerly between graphs: a split op's `direct` implementation,
    under a profiler range of the op's name while a profiler runs, or `target` itself.

    The dispatcher costs a custom op ~50 us a call in Python (default filling, ADInplaceOrView, Dynamo's disable
    wrapper), paid by every split op of every step in pcg and graph-free modes, and by BCG's replays (its capture
    finds split ops through the dispatcher, so only its recorded calls use this). Not inside a trace.
    """
    op = split_op_of(target)
    if op is None or op.direct is None or not serves_overload(target):
        return target
    fn, name = op.direct, op.name

    def direct(*args, **kwargs):
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.autograd.profiler.record_function(name):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    direct.__name__ = f"direct_{name.replace('::', '_')}"
    return direct


def reads_input_layout(target) -> bool:
    """Whether a call to `target` may depend on how its tensor arguments are laid out, not only on their values: a
    custom op outside torch's own namespaces (a user's kernel may assume contiguous rows; torch hands a custom op the
    strides it has in eager, inductor's `needs_fixed_stride_order`), unless it is a split op registered with
    `strided_inputs=True`."""
    packet = custom_op(target)
    if packet is None:
        return False
    op = split_op_of(packet)
    return op is None or not op.strided_inputs


def custom_op(target) -> torch._ops.OpOverloadPacket | None:
    """The packet of a `torch.library` op (or overload) outside torch's own namespaces, or None."""
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name.split("::")[0] not in \
            _OWN_NAMESPACES:
        return target
    return None


def split_ops() -> list[SplitOp]:
    with _LOCK:
        return list(_OPS.values())


# -- attention and mixers that are not split ops ------------------------------------------------------------------
# aten-level attention ops (and the torch function Dynamo records for F.scaled_dot_product_attention)
ATTENTION_ATEN = frozenset({
    "scaled_dot_product_attention", "_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward", "_efficient_attention_forward", "_cudnn_attention_forward",
})
# names of custom ops / user Triton kernels that are batch-dependent mixers unless registered
MIXER_NAME = re.compile(r"attn|attention|delta_rule|mamba|scan|ssm|lightning|conv1d|varlen|retention|rwkv|hgrn|"
                        r"recurren|flash|mixer|selective_state|kv_?cache|reshape_and_cache|"
                        r"(^|_)(gla|gsa|kda|sdpa|mla|ssd|lstm|mlstm|rnn|rglru|gru)(_|$)")
_OWN_NAMESPACES = ("aten", "prims", "_c10d_functional", "c10d")


def unregistered_mixer(target) -> str | None:
    """What `target` (an op, an overload or its packet) is, if it is attention or a mixer kernel that is not a
    registered split op, else None. Captured in a CUDA graph, such a call would replay with the batch metadata of
    capture time and give wrong answers (the bug class hattn exists to make impossible)."""
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if not isinstance(target, torch._ops.OpOverloadPacket) or split_op_of(target) is not None:
        return None
    ns, name = target._qualified_op_name.split("::", 1)
    if ns == "aten" and name in ATTENTION_ATEN:
        return f"aten.{name}"
    if custom_op(target) is not None and MIXER_NAME.search(name.lower()):
        return f"custom op {ns}::{name}"
    return None


# -- modes ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    """A graph strategy: how a compiled (split) graph is run. Each runtime module registers its own.

    graphs  captures CUDA graphs (on a CPU, or for inputs not on CUDA, the mode runs graph-free, logged once)
    build   (config, split_gm, example_inputs, stats) -> the callable that serves the graph
    """

    name: str
    description: str
    graphs: bool
    build: Callable


_MODES: dict[str, Mode] = {}


def register_mode(mode: Mode) -> Mode:
    with _LOCK:
        _MODES[mode.name] = mode
    return mode


def modes() -> dict[str, Mode]:
    """Every registered mode by name, in registration order."""
    import hattn.runtime  # noqa: F401  (each runtime module registers its mode on import)

    with _LOCK:
        return dict(_MODES)


def mode(name: str) -> Mode:
    known = modes()
    if name not in known:
        raise ValueError(f"unknown hattn mode {name!r}; valid modes: {', '.join(known)}")
    return known[name]


def check_route(op_kind: str, layer_id: int, layer_kinds: dict[int, str] | None) -> None:
    """Cross-check a split-op call against the model's layer kinds; a mismatch is an error, never a reroute.

    `layer_kinds` maps layer id -> kind, built from the model's config (`layer_types` or the family's
    equivalent). None means the caller has no model table (a bare toy model): any kind is accepted.
    """
    if layer_kinds is None:
        return
    expected = layer_kinds.get(layer_id)
    if expected is None:
        raise RegistryError(
            f"layer {layer_id} called a {op_kind!r} split op but the model's layer table has no layer {layer_id} "
            f"(known: {sorted(layer_kinds)})"
        )
    if expected != op_kind:
        raise RegistryError(
            f"layer {layer_id} is a {expected!r} layer in the model config but called a {op_kind!r} split op; "
            f"fix the adapter or the config's layer_types (hattn never reroutes silently)"
        )

"""The split-op registry: the one place that knows what a split op is.

A *split op* is a `torch.library` custom op with a *kind* ("full", "linear", or a user kind such as "mamba").
The registry answers, and nothing else in hattn answers:

- is this FX node / callable a split op?            -> `split_op_of(target)`
- must this call run outside a CUDA graph?           -> every split op: yes (`runs_outside_graph`)
- which kind serves layer `layer_id`?                -> `check_route(kind, layer_id, layer_kinds)`

Routing is by the op's registered kind and the layer id only, never by a module's class or a flag on it
(the sglang bugs in shared/seeds/001 and 003).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch

BUILTIN_KINDS = ("full", "linear")


@dataclass(frozen=True)
class SplitOp:
    """A registered split op: its overload packet (what Dynamo graphs hold) and its kind."""

    packet: torch._ops.OpOverloadPacket
    kind: str
    capture_safe: bool = False  # may run inside a single CUDA graph (`mode="full"`)
    direct: Callable | None = None  # the op's implementation, a plain function of the same signature (see direct_call)

    @property
    def name(self) -> str:
        return self.packet._qualified_op_name  # e.g. "hattn::full_attention"


_LOCK = threading.Lock()
_OPS: dict[str, SplitOp] = {}  # qualified name -> SplitOp


class RegistryError(ValueError):
    """A split op was registered or routed in a way that could give wrong results."""


def _packet_of(op) -> torch._ops.OpOverloadPacket:
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op
    if isinstance(op, torch._ops.OpOverload):
        return op.overloadpacket
    if isinstance(op, str) and "::" in op:
        ns, name = op.split("::", 1)
        return getattr(getattr(torch.ops, ns), name.split(".")[0])
    if hasattr(op, "_opoverload"):  # torch.library.custom_op's CustomOpDef
        return op._opoverload.overloadpacket
    raise RegistryError(
        f"{op!r} is not a torch custom op. Define it with torch.library.custom_op (or torch.library.define) "
        f"and pass torch.ops.<ns>.<name> to register_split_op."
    )


def register_split_op(op, kind: str, *, capture_safe: bool = False, direct: Callable | None = None) -> SplitOp:
    """Register a custom op as a split op of `kind`.

    `op` is `torch.ops.ns.name`, one of its overloads, the object `torch.library.custom_op` returned, or the
    string "ns::name". Registering the same op again with the same kind is a no-op; with another kind, an error.
    `capture_safe=True` declares that the op's kernels keep fixed addresses and never sync with the host, so
    `mode="full"` may capture it inside one graph. `direct` is the op's implementation as a plain Python function
    (the same for every device): graph runtimes then call it between graphs without the dispatcher (see
    `direct_call`).
    """
    if not isinstance(kind, str) or not kind.isidentifier():
        raise RegistryError(f"split-op kind must be an identifier string such as 'mamba', got {kind!r}")
    if direct is not None and not callable(direct):
        raise RegistryError(f"direct= must be the op's implementation function, got {direct!r}")
    packet = _packet_of(op)
    entry = SplitOp(packet, kind, capture_safe, direct)
    with _LOCK:
        old = _OPS.get(entry.name)
        if old is not None and old.kind != kind:
            raise RegistryError(
                f"{entry.name} is already a split op of kind {old.kind!r}; it cannot also be {kind!r}. "
                f"Call unregister_split_op first if you mean to change it."
            )
        _OPS[entry.name] = entry
    return entry


def unregister_split_op(op) -> None:
    """Forget a split op (tests and users replacing a registration)."""
    with _LOCK:
        _OPS.pop(_packet_of(op)._qualified_op_name, None)


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


def direct_call(target) -> Callable:
    """What a runtime calls for `target` when it runs eagerly between graphs: a split op's `direct` implementation,
    under a profiler range of the op's name while a profiler runs, or `target` itself.

    The dispatcher costs a custom op ~50 us a call in Python (default filling, ADInplaceOrView, Dynamo's disable
    wrapper), paid by every split op of every step in pcg and graph-free modes, and by BCG's replays (its capture
    finds split ops through the dispatcher, so only its recorded calls use this). Not inside a trace.
    """
    op = split_op_of(target)
    if op is None or op.direct is None:
        return target
    fn, name = op.direct, op.name

    def direct(*args, **kwargs):
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.autograd.profiler.record_function(name):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    direct.__name__ = f"direct_{name.replace('::', '_')}"
    return direct


def is_split_op(target) -> bool:
    return split_op_of(target) is not None


def runs_outside_graph(target) -> bool:
    """Must this call run eagerly, outside any piecewise/breakable CUDA graph? Every split op must."""
    return is_split_op(target)


def split_ops() -> list[SplitOp]:
    with _LOCK:
        return list(_OPS.values())


def kinds() -> set[str]:
    return {op.kind for op in split_ops()}


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

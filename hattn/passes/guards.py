"""Guard passes: reject attention (or a linear-attention / SSM kernel) that is not a registered split op.

Such a call would be captured inside a CUDA graph with the batch metadata of capture time and give wrong answers
on replay (a peer's linear-attention layer, silently captured, did exactly that). It is an error before anything is
captured, naming the node, its source line and the fix. What counts as attention is the registry's call
(`registry.unregistered_mixer`); this pass adds what only an FX graph shows: Dynamo's SDPA function and
higher-order ops (flex attention, user Triton kernels named like mixers).

A graph with no split op at all but attention written out in plain ops (transformers' "eager" attention: softmax of
a product of two activations) or a KV-cache write (an in-place write of activations into a graph input, as
transformers' StaticCache does) is hattn doing nothing: `check_split_ops_present` refuses it in graph modes and
warns in mode eager. When the graph comes from a transformers model, every fix named is `hattn.compile` /
`hattn.adapt`.
"""
from __future__ import annotations

import operator
import re
import warnings

import torch
import torch.fx as fx

from hattn import registry
from hattn.registry import MIXER_NAME, RegistryError, UnregisteredAttentionError, split_op_of, unregistered_mixer

_MIXER_HOPS = ("flex_attention", "triton_kernel_wrapper")

__all__ = ["UnregisteredAttentionError", "NoSplitOpError", "NoSplitOpWarning", "SplitOpInContextError",
           "check_no_unregistered_attention", "check_split_ops_outside_contexts", "check_split_ops_present",
           "unregistered_attention_reason", "attention_without_split_op", "RegisteredAfterCompile", "AsRegistered",
           "GraphWrapper"]


class NoSplitOpError(UnregisteredAttentionError):
    """A graph mode got a graph with attention-like compute but no split op."""


class NoSplitOpWarning(UserWarning):
    """Mode eager got a graph with attention-like compute but no split op (it runs, without hattn's attention)."""


class SplitOpInContextError(ValueError):
    """A split op called inside a `with` block that Dynamo records as enter/exit calls (autocast, inference_mode)."""


def unregistered_attention_reason(node: fx.Node) -> str | None:
    """Why `node` must not be captured in a graph, or None if it is fine."""
    if node.op != "call_function" or split_op_of(node) is not None:
        return None
    target = node.target
    if getattr(target, "__name__", "") == "scaled_dot_product_attention":  # torch._C._nn function in Dynamo graphs
        return "torch scaled_dot_product_attention"
    if isinstance(target, torch._ops.HigherOrderOperator):
        name = target.name()
        if name.startswith(_MIXER_HOPS) and (name.startswith("flex") or MIXER_NAME.search(_kernel_name(node))):
            return f"{name} ({_kernel_name(node) or 'flex attention'})"
        return None
    return unregistered_mixer(target)


def _kernel_name(node: fx.Node) -> str:
    idx = node.kwargs.get("kernel_idx")
    if idx is None:
        return ""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernel = kernel_side_table.get_kernel(idx)
    return getattr(getattr(kernel, "fn", kernel), "__name__", "").lower()


def source_line(node: fx.Node) -> str:
    """The user's source line that created `node` (last frame of its stack trace), or a note that none is known."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not frames:
        return "<source line unknown>"
    path, line, func, code = frames[-1]
    return f"{path}:{line} in {func}: {code.strip()}"


def transformers_class(gm: fx.GraphModule) -> str | None:
    """The name of the outermost transformers module the graph's nodes come from, or None."""
    for node in gm.graph.nodes:
        for _, cls in (node.meta.get("nn_module_stack") or {}).values():
            if getattr(cls, "__module__", "").startswith("transformers."):
                return cls.__name__
    return None


def fix_for(gm: fx.GraphModule) -> str:
    cls = transformers_class(gm)
    if cls is not None:
        return (f"Fix: this graph comes from a transformers model ({cls}): hattn.compile(model) adapts and compiles "
                f"it (then model.generate(...)); for your own loop, torch.compile(hattn.adapt(model), "
                f"backend='hattn')")
    return ("Fix: for a transformers model, hattn.compile(model) (or torch.compile(hattn.adapt(model), "
            "backend='hattn')) routes its attention through hattn's split ops; for your own kernel, register its "
            "custom op: hattn.register_split_op(torch.ops.<ns>.<op>, kind=...)")


def check_no_unregistered_attention(gm: fx.GraphModule) -> None:
    """Raise UnregisteredAttentionError for the first attention/mixer node that is not a registered split op, and
    for a split op or mixer inside a higher-order op's body (checkpoint, cond, ...): the graph is split at top-level
    calls only, so such a call would run inside a piece."""
    for node in gm.graph.nodes:
        reason = unregistered_attention_reason(node)
        if reason is not None:
            raise UnregisteredAttentionError(
                f"node {node.name!r} calls {reason}, which is not a registered hattn split op; captured in a CUDA "
                f"graph it would replay with stale batch metadata.\n  at {source_line(node)}\n{fix_for(gm)}"
            )
    for name, body in gm.named_modules():
        if body is gm or not isinstance(body, fx.GraphModule):
            continue
        for node in body.graph.nodes:
            op = split_op_of(node)
            reason = f"split op {op.name}" if op is not None else unregistered_attention_reason(node)
            if reason is not None:
                raise UnregisteredAttentionError(
                    f"node {node.name!r} of {name!r}, the body of a higher-order op (torch.utils.checkpoint, "
                    f"torch.cond, ...), calls {reason}: hattn splits a graph at top-level calls only, so it would run "
                    f"inside a piece (and be captured in a CUDA graph).\n  at {source_line(node)}\nCall the layer "
                    f"outside checkpoint / cond when compiling with hattn (checkpointing is for training; hattn "
                    f"serves inference)."
                )


def with_block_call(node: fx.Node) -> str:
    """The name of the `_enter_*` / `_exit_*` function a node calls, as Dynamo records a `with` block's start and
    end (autocast, inference_mode, ...); "" for any other node."""
    name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    return name if name.startswith(("_enter_", "_exit_")) else ""


def grad_mode_switch(node: fx.Node) -> bool:
    """Whether a node is what Dynamo records for `with torch.no_grad()` / `enable_grad()`: `_set_grad_enabled`."""
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "_set_grad_enabled"


def check_split_ops_outside_contexts(gm: fx.GraphModule) -> None:
    """Raise SplitOpInContextError for a split op called inside a `with torch.autocast(...)` or
    `with torch.inference_mode()` block. Dynamo records such a block as an `_enter_*` call whose result the matching
    `_exit_*` call takes; a split op between them splits the block over two pieces (the context object would cross
    the piece boundary, which inductor cannot compile, and a piece's graph replays without entering the context).
    Grad mode (`torch.no_grad()`) is a plain `_set_grad_enabled` call and splits fine."""
    open_blocks: dict[fx.Node, None] = {}
    for node in gm.graph.nodes:
        name = with_block_call(node)
        if name.startswith("_enter_"):
            open_blocks[node] = None
        elif name.startswith("_exit_") and node.args and node.args[0] in open_blocks:
            del open_blocks[node.args[0]]
        elif open_blocks and split_op_of(node) is not None:
            block = next(reversed(open_blocks))
            kind = getattr(block.target, "__name__", "")[len("_enter_"):]
            raise SplitOpInContextError(
                f"split op {split_op_of(node).name} (node {node.name!r}) is called inside a `with` block ({kind}); "
                f"hattn splits the graph at split ops, and such a block cannot span two pieces.\n  at "
                f"{source_line(node)}\nFix: move the split-op call out of the block, or apply the block's setting "
                f"inside the op's own implementation."
            )


# -- attention written out in plain ops, in a graph without split ops -----------------------------------------------
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax"}
_PRODUCT = {"matmul", "__matmul__", "bmm", "mm", "einsum", "baddbmm"}
# ops between attention's score product and its softmax (scaling, masking, soft-capping, casts, reshapes)
_SCORE_OPS = {"mul", "__mul__", "truediv", "div", "__truediv__", "add", "__add__", "iadd", "sub", "where",
              "masked_fill", "masked_fill_", "tanh", "clamp", "to", "float", "type_as", "_to_copy", "contiguous",
              "clone", "view", "reshape", "transpose", "permute", "getitem", "__getitem__"}
_WRITES = {"setitem", "index_copy_", "index_put_", "copy_", "scatter_", "index_add_"}
_VIEWS = {"getitem", "__getitem__", "view", "select", "narrow", "transpose", "permute", "reshape", "unsqueeze",
          "squeeze", "expand", "as_strided"}


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return ""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::", 1)[1]
    return getattr(target, "__name__", "")


def _written_root(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place write (`x[i] = v`, `x.index_copy_(...)`, `x.mul_(...)`) changes, through views."""
    name = _op_name(node)
    in_place = name in _WRITES or (name.endswith("_") and not name.startswith("_"))
    if not in_place or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    dest = node.args[0]
    while _op_name(dest) in _VIEWS and dest.args and isinstance(dest.args[0], fx.Node):
        dest = dest.args[0]
    return dest


def _activations(gm: fx.GraphModule, example_inputs) -> set[fx.Node]:
    """Nodes computed from graph inputs other than parameters (the batch's data, caches, buffers), including
    tensors an in-place write filled with such values (a cache created inside the graph, then written)."""
    params = {n for n, x in zip(gm.graph.find_nodes(op="placeholder"), example_inputs or ())
              if isinstance(x, torch.nn.Parameter)}
    act: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node not in params:
                act.add(node)
        elif node.op == "get_attr":
            if not isinstance(operator.attrgetter(node.target)(gm), torch.nn.Parameter):
                act.add(node)
        elif any(i in act for i in node.all_input_nodes):
            act.add(node)
            root = _written_root(node)
            if root is not None:
                act.add(root)
    return act


def _softmax_of_product(node: fx.Node, act: set[fx.Node]) -> str | None:
    """'softmax of an activation product' when `node` is a softmax whose input is, through scaling, masking and
    casts only, a matmul of two activations (attention scores); a router's softmax of a linear layer is not."""
    if _op_name(node) not in _SOFTMAX or not node.all_input_nodes:
        return None
    todo, seen = [node.all_input_nodes[0]], set()
    while todo:
        n = todo.pop()
        seen.add(n)
        name = _op_name(n)
        if name in _PRODUCT and sum(i in act for i in n.all_input_nodes) >= 2:
            return f"softmax of an activation product ({n.name}: {name})"
        if name in _SCORE_OPS:
            todo += [i for i in n.all_input_nodes if i in act and i not in seen]
    return None


def _cache_write(node: fx.Node, act: set[fx.Node]) -> str | None:
    """'a KV-cache write' when `node` writes activations in place into (a view of) a graph input."""
    name = _op_name(node)
    dest = _written_root(node) if name in _WRITES else None
    if dest is None or dest.op not in ("placeholder", "get_attr"):
        return None
    if any(i in act for i in node.all_input_nodes if i is not node.args[0]):
        return f"a KV-cache write into graph input {dest.name!r} ({name})"
    return None


def attention_without_split_op(gm: fx.GraphModule, example_inputs=None) -> tuple[fx.Node, str] | None:
    """(node, what) for the first attention-like node of a graph that has no split op; None otherwise.

    example_inputs: the graph's inputs (Dynamo's), to tell parameters from activations.
    """
    if any(split_op_of(n) is not None for n in gm.graph.nodes):
        return None
    act = _activations(gm, example_inputs)
    for node in gm.graph.nodes:
        what = _softmax_of_product(node, act) or _cache_write(node, act)
        if what is not None:
            return node, what
    return None


def check_split_ops_present(gm: fx.GraphModule, example_inputs, mode: str, graphs: bool) -> None:
    """Refuse (a graph mode: `graphs`) or warn about (mode eager) attention-like compute with no split op."""
    found = attention_without_split_op(gm, example_inputs)
    if found is None:
        return
    node, what = found
    head = f"the graph has {what} but no hattn split op (node {node.name!r} at {source_line(node)}): "
    if graphs:
        raise NoSplitOpError(
            f"{head}mode {mode!r} would capture the model's own attention and cache writes into CUDA graphs as they "
            f"are, with the batch layout of capture time, and hattn would serve none of it.\n{fix_for(gm)}"
        )
    warnings.warn(f"{head}mode 'eager' runs it as it is, without hattn's attention or cache.\n{fix_for(gm)}",
                  NoSplitOpWarning, stacklevel=2)


class RegisteredAfterCompile(RegistryError):
    """A compiled graph holds a custom op whose registration changed since: it would run as it no longer should."""


class GraphWrapper:
    """A compiled graph's callable `fn` wrapped with a check per call; the graph's own attributes (runtime stats,
    plans) stay reachable through it."""

    def __getattr__(self, name: str):
        if name == "fn":  # not set yet (a copy being built)
            raise AttributeError(name)
        return getattr(self.fn, name)


class AsRegistered(GraphWrapper):
    """The compiled graph `fn`, called only while the registry still says of the custom ops in `gm` what it said
    when `gm` was compiled, where the difference could make the graph wrong: an op registered as a split op since
    runs inside a piece (captured in a CUDA graph, it would replay with the batch of capture); in mode "full" a
    split op declared capture-safe then is captured though it no longer is; one declared to take strided inputs
    then may get a column slice of a fused GEMM's output though it no longer takes one. Dynamo has no guard on hattn's
    registry, so this is checked here: one integer compare per call, the ops looked up only after a registration."""

    def __init__(self, fn, ops: dict, full: bool):
        self.fn, self.ops, self.full, self.generation = fn, ops, full, registry.generation()

    @classmethod
    def wrap(cls, fn, gm: fx.GraphModule, full: bool):
        """`fn` guarded by the registrations of the custom ops `gm` calls (fn itself when it calls none)."""
        graphs = [m for m in gm.modules() if isinstance(m, fx.GraphModule)]  # higher-order ops' bodies too
        packets = (registry.custom_op(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function")
        ops = {packet: split_op_of(packet) for packet in packets if packet is not None}
        return cls(fn, ops, full) if ops else fn

    def __call__(self, *args):
        if registry.generation() != self.generation:
            self._check()
        return self.fn(*args)

    def _check(self) -> None:
        for packet, then in self.ops.items():
            now = split_op_of(packet)
            if then is None and now is not None:
                raise RegisteredAfterCompile(
                    f"hattn: {now.name} was registered as a split op (kind {now.kind!r}) after this graph was "
                    f"compiled, so the graph runs it inside a compiled piece (captured in a CUDA graph it would "
                    f"replay with the batch of capture). Register split ops before the model's first call, or "
                    f"compile again: torch._dynamo.reset() (or a new torch.compile / hattn.compile)")
            if now is None:  # unregistered since: it runs between pieces as compiled, its kernels as they were
                continue
            lost = self._relied_on(then) - self._relied_on(now)
            if lost:
                flag = sorted(lost)[0]
                raise RegisteredAfterCompile(
                    f"hattn: {now.name} was registered again with {flag}=False after this graph was compiled "
                    f"relying on it ({_RELIED_ON[flag]}). Compile again: torch._dynamo.reset() (or a new "
                    f"torch.compile / hattn.compile)")
        self.generation = registry.generation()

    def _relied_on(self, op) -> set[str]:
        """The flags of split op `op` (None: not one) that this graph may rely on."""
        if op is None:
            return set()
        return {flag for flag, on in (("capture_safe", op.capture_safe and self.full),
                                      ("strided_inputs", op.strided_inputs)) if on}


_RELIED_ON = {"capture_safe": "captured in mode full",
              "strided_inputs": "its inputs may be column slices of a fused GEMM's output"}

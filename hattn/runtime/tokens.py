"""Which inputs and outputs follow the token count, and padding them up to a capture size.

Graph runtimes replay graphs captured at fixed sizes: a call with T tokens runs at the smallest capture size
S >= T, with every token-dependent input zero-padded to S (padding rows are zeros, never uninitialised memory) and
every token-dependent output sliced back to T (and cloned, so the caller owns it).

Inputs fall in three groups. Token-dependent tensors are copied into runtime-owned, zero-padded static buffers.
Other tensors passed as forward arguments ("owned": e.g. the ids of a static graph) are copied into runtime-owned
buffers too, so a later call never writes into a tensor the caller kept. Everything else (parameters, buffers, cache
tensors reached through attributes) is module state: the graphs read and mutate it in place; if its address
changes, its new content is copied into the tensor captured in its place.
"""
from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_map


@dataclass
class TokenLayout:
    """Token-dependent positions of a callable's flat inputs and outputs.

    in_dims[i]   the dims of tensor input i whose size is the token count ((): not token-dependent)
    in_ints      indices of int inputs that are the token count itself (Dynamo's SymInt placeholders)
    out_dims[j]  likewise for outputs; None = discover at run time: every tensor whose dim `out_dim` has the
                 padded size (outputs of any pytree structure)
    owned        indices of other tensor inputs that are forward arguments (copied into owned static buffers)
    unread       indices of inputs no node of the graph reads (parameters fused into one buffer at compile time):
                 their storage may change without the graphs reading stale memory
    reason       why graphs cannot serve this callable (e.g. several dynamic sizes), or None
    """

    in_dims: list[tuple[int, ...]]
    in_ints: list[int] = field(default_factory=list)
    out_dims: list[tuple[int, ...]] | None = None
    owned: list[int] = field(default_factory=list)
    reason: str | None = None
    unread: frozenset[int] = frozenset()
    out_dim: int = 0

    def num_tokens(self, args) -> int:
        for i in self.in_ints:
            return int(args[i])
        i = self.first_token_input
        if i is None:
            raise ValueError("no input follows the token count; graphs need a token dimension to pad")
        return args[i].shape[self.in_dims[i][0]]

    @functools.cached_property
    def first_token_input(self) -> int | None:
        """The first tensor input with a token dim (asked at every step: in_dims also lists every parameter)."""
        return next((i for i, dims in enumerate(self.in_dims) if dims), None)

    @property
    def has_tokens(self) -> bool:
        return bool(self.in_ints) or self.first_token_input is not None


def _symints(value) -> list:
    """The sizes of a SymInt (itself) or a tensor (its shape) that are SymInts; nothing for any other value."""
    sizes = [value] if isinstance(value, torch.SymInt) else value.shape if isinstance(value, torch.Tensor) else ()
    return [s for s in sizes if isinstance(s, torch.SymInt)]


def _sym_exprs(value) -> list:
    """The symbolic sizes of a SymInt or tensor; a SymInt Dynamo specialized to a constant (under dynamic=True a
    dim of 3 that the model unbinds) is a fixed size, not one derived from the token count."""
    return [s.node.expr for s in _symints(value) if not s.node.expr.is_number]


def _several_sizes(symbols: set, values: list) -> str:
    """Why a graph of several dynamic sizes runs graph-free, each size named by where Dynamo took it from, and the
    fix where one is an input's stride or storage offset (a view passed as an input)."""
    env = next((s.node.shape_env for v in values for s in _symints(v)), None)
    named = []
    for symbol in sorted(symbols, key=str):
        sources = getattr(env, "var_to_sources", {}).get(symbol, [])
        names = [src.name() if callable(src.name) else src.name for src in sources]
        named.append(f"{symbol} ({', '.join(names)})" if names else str(symbol))
    reason = f"the graph has several dynamic sizes: {'; '.join(named)}; graphs pad one token count"
    if any(".stride()" in n or ".storage_offset()" in n for n in named):
        reason += (". An input that is a view (a slice at an offset, or strided) gets its offset or stride traced "
                   "as a size of its own: pass inputs with contiguous memory of their own (x.clone()), as "
                   "hattn.runtime.tokens.plain_layout makes them")
    return reason


def plain_layout(x: torch.Tensor) -> torch.Tensor:
    """`x` as a contiguous tensor at storage offset 0, copied only if it is not one already; an inference tensor
    only if `x` is one. A view at an offset or with its base's strides, passed to a compiled model with a dynamic
    dim, gets a symbol of its own for that offset or stride from Dynamo (an offset of 0 and contiguous strides it
    specializes): a second dynamic size, and graph modes run such a graph graph-free."""
    if x.storage_offset() == 0 and x.is_contiguous():
        return x
    with torch.inference_mode(x.is_inference()):
        return x.clone(memory_format=torch.contiguous_format)


def _dims_of(value, symbol) -> tuple[int, ...]:
    if not isinstance(value, torch.Tensor):
        return ()
    return tuple(d for d, s in enumerate(value.shape) if isinstance(s, torch.SymInt) and s.node.expr == symbol)


def layout_from_examples(inputs: list, outputs: list, forward_args: set[int] = frozenset()) -> TokenLayout:
    """Layout of a Dynamo graph from its placeholders' and outputs' example values (fake, maybe symbolic).

    forward_args: indices of inputs that are the forward's own arguments (not module state). A graph with one
    symbol is padded along it; a static graph is captured at its one size; a graph with several symbols, or sizes
    derived from the symbol, gets a `reason` and runs graph-free.
    """
    exprs = [e for v in list(inputs) + list(outputs) for e in _sym_exprs(v)]
    symbols = {s for e in exprs for s in e.free_symbols}
    n = len(inputs)
    if len(symbols) > 1:
        return TokenLayout([()] * n, reason=_several_sizes(symbols, list(inputs) + list(outputs)))
    if symbols:
        (symbol,) = symbols
        derived = sorted({str(e) for e in exprs if e != symbol})
        if derived:
            return TokenLayout([()] * n, reason=f"sizes derived from the token count ({', '.join(derived)})")
    else:  # a static graph: one fixed size, nothing to pad
        symbol = None
    dims = [_dims_of(v, symbol) for v in inputs]
    ints = [i for i, v in enumerate(inputs) if isinstance(v, torch.SymInt)]
    owned = [i for i in sorted(forward_args) if isinstance(inputs[i], torch.Tensor) and not dims[i]]
    return TokenLayout(dims, ints, [_dims_of(v, symbol) for v in outputs], owned)


def layout_from_args(args, token_dim: int = 0) -> TokenLayout:
    """Layout of a plain callable: tensor args whose `token_dim` has the first tensor arg's size are token-dependent;
    every other tensor arg is owned (a forward argument)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors:
        raise ValueError("a graph runner needs at least one tensor argument (its token dimension is padded)")
    if tensors[0].dim() <= token_dim:
        raise ValueError(f"token_dim={token_dim} but the first tensor argument has shape {list(tensors[0].shape)}")
    n = tensors[0].shape[token_dim]
    dims = [(token_dim,) if isinstance(a, torch.Tensor) and a.dim() > token_dim and a.shape[token_dim] == n else ()
            for a in args]
    owned = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and not dims[i]]
    return TokenLayout(dims, out_dims=None, owned=owned, out_dim=token_dim)


def pick_size(sizes: list[int], num_tokens: int) -> int | None:
    """The smallest capture size >= num_tokens, or None above the largest."""
    i = bisect.bisect_left(sizes, num_tokens)
    return sizes[i] if i < len(sizes) else None


class StaticInputs:
    """Static buffers of the token-dependent and owned inputs, one set for every capture size; module state passes
    through unchanged.

    A token-dependent input gets one flat storage sized for the largest capture size; the input of size S is the
    contiguous prefix of that storage viewed with S tokens (as nano-vllm slices one set of largest-size buffers), so
    every size reads fixed addresses and the buffers cost one size's memory, not the sum over sizes.
    """

    def __init__(self, layout: TokenLayout, largest: int):
        self.layout, self.largest = layout, largest
        self.storage: list | None = None
        self.views: dict[tuple[int, int], torch.Tensor] = {}  # (input, size) -> its view of the storage
        self.token_inputs = [(i, dims) for i, dims in enumerate(layout.in_dims) if dims]  # not the ~300 parameters

    def fill(self, size: int, args, num_tokens: int | None) -> list:
        """args with token-dependent tensors copied into the size's zero-padded static views (num_tokens rows)
        and owned tensors copied into their static buffers (only when the caller passed another tensor)."""
        if self.storage is None:
            self.storage = [_new_storage(a, i, self.layout, self.largest) for i, a in enumerate(args)]
        out = list(args)
        for i, dims in self.token_inputs:
            view = self.views.get((i, size))
            if view is None or view.dtype != args[i].dtype or view.device != args[i].device:
                view = self.views[(i, size)] = _sized_view(self.storage[i], args[i], dims, size)
            _copy_padded(view, args[i], dims, num_tokens)
            out[i] = view
        for i in self.layout.owned:
            buf = self.storage[i]
            if args[i].data_ptr() != buf.data_ptr():
                _check_same(buf, args[i])
                buf.copy_(args[i])
            out[i] = buf
        for i in self.layout.in_ints:
            out[i] = size
        return out


def _sized_shape(arg: torch.Tensor, dims: tuple[int, ...], size: int) -> list[int]:
    shape = list(arg.shape)
    for d in dims:
        shape[d] = size
    return shape


def _new_storage(arg, i: int, layout: TokenLayout, largest: int):
    if i in layout.owned:
        return torch.zeros_like(arg, memory_format=torch.contiguous_format)
    dims = layout.in_dims[i] if i < len(layout.in_dims) else ()
    if not dims:
        return None
    return torch.zeros(math.prod(_sized_shape(arg, dims, largest)), dtype=arg.dtype, device=arg.device)


def _sized_view(storage: torch.Tensor, arg: torch.Tensor, dims: tuple[int, ...], size: int) -> torch.Tensor:
    """The contiguous prefix of `storage` viewed as `arg` with `size` tokens (the same address at every call)."""
    if arg.dtype != storage.dtype or arg.device != storage.device:
        raise TypeError(
            f"a graph input changed from {storage.dtype} on {storage.device} to {arg.dtype} on {arg.device}; graphs "
            f"were captured for {storage.dtype} on {storage.device}: pass inputs of that dtype and device (or "
            f"recompile)"
        )
    shape = _sized_shape(arg, dims, size)
    return storage[:math.prod(shape)].view(shape)


def _check_same(buf: torch.Tensor, arg: torch.Tensor) -> None:
    if arg.shape != buf.shape or arg.dtype != buf.dtype or arg.device != buf.device:
        raise TypeError(
            f"a graph input is {arg.dtype}{list(arg.shape)} on {arg.device} but graphs were captured for "
            f"{buf.dtype}{list(buf.shape)} on {buf.device}; pass inputs of that dtype, shape and device (or recompile)"
        )


def _copy_padded(buf: torch.Tensor, arg: torch.Tensor, dims: tuple[int, ...], n: int) -> None:
    view = buf
    for d in dims:
        if n < buf.shape[d]:
            view.narrow(d, n, buf.shape[d] - n).zero_()
        view, arg = view.narrow(d, 0, n), arg.narrow(d, 0, n)
    view.copy_(arg)


def unpad_outputs(outputs, layout: TokenLayout, size: int, num_tokens: int):
    """Slice token dims back to num_tokens and clone every tensor (the caller owns what it gets)."""
    if layout.out_dims is not None and isinstance(outputs, (tuple, list)):
        return type(outputs)(_unpad(o, layout.out_dims[j], size, num_tokens) for j, o in enumerate(outputs))
    if layout.out_dims is not None:
        return _unpad(outputs, layout.out_dims[0], size, num_tokens)

    def discover(o):
        dims = (layout.out_dim,) if isinstance(o, torch.Tensor) and o.dim() > layout.out_dim and \
            o.shape[layout.out_dim] == size else ()
        return _unpad(o, dims, size, num_tokens)

    return tree_map(discover, outputs)


def _unpad(o, dims: tuple[int, ...], size: int, num_tokens: int):
    if not isinstance(o, torch.Tensor):
        return o
    for d in dims if size != num_tokens else ():
        o = o.narrow(d, 0, num_tokens)
    return o.clone()

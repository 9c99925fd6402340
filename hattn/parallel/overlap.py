"""Two-batch overlap: one step's packed batch run as two micro-batches, so that on GPUs one micro-batch's
all-reduces overlap the other's compute.

    model = TwoBatchOverlap.for_model(lm, compile=lambda m: torch.compile(m, backend=hattn.backend(mode="pcg")))
    generate(model, prompts, cache, params, layer_kinds=lm.layer_kinds)      # a drop-in step function

The step's sequences are split at the sequence boundary that best balances their tokens (never inside a sequence).
Each micro-batch runs under its own `ForwardContext` (its sequences' lengths, context lengths and cache slots; the
same cache), and the outputs are concatenated in order. The wrapper never names a split op or a kind: every split
op, of every kind the registry holds or will hold, reads its batch metadata from the forward context, so each
micro-batch's ops see that micro-batch and nothing else. (A peer's wrapper that delegated backend methods one by
one forgot `forward` of its linear-attention backend, and sliced mrope positions on the wrong dimension.)

Per-token inputs are sliced on their token dimension, given per argument (`token_dims`): input ids [T] on dim 0,
positions [T] or mrope positions [3, T] on their last dim; an argument whose token dimension does not hold the
step's token count is an error, never a silent mis-slice (a caller's padding rows, `ForwardContext.padding`, are
dropped; a one-token micro-batch is padded to two rows, so that it replays the graph of every other size). One
more argument may follow them: `logits_rows` [R], rows of the step's tokens whose logits alone are wanted (a
prefill's last tokens). Each micro-batch gets all R rows as its own rows (clamped into its
range, so R and the graphs stay fixed), and each row's logits are taken from the micro-batch that holds it, on the
device.

On CUDA, with two model instances, micro-batch A runs on one stream and B on another; B's instance is a replica
(same weights) whose collectives use a sibling process group, i.e. its own NCCL communicator, so the two
micro-batches' all-reduces neither serialize nor wait behind each other while the other's kernels run. Each instance
has its own compiled graphs and static buffers (the two streams never share one), so each needs a backend object of
its own: one `hattn.backend(...)` for both compiles their graph once, and is an error. With one instance, or on CPU,
the micro-batches run one after the other (same results).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from hattn.context import ForwardContext, forward_context, get_forward_context
from hattn.parallel.tp import replica
from hattn.runtime.tokens import plain_layout

INPUT_IDS_DIM = 0  # input ids [T]
POSITIONS_DIM = -1  # positions [T] or mrope positions [3, T]: the tokens are the last dimension
TOKEN_DIMS = (INPUT_IDS_DIM, POSITIONS_DIM)  # a HybridLM step: (input_ids, positions)


@dataclass(frozen=True)
class MicroBatch:
    """Consecutive sequences of a step: their forward context and their rows of the packed token dimension."""

    ctx: ForwardContext
    rows: slice


def split_point(seq_lens: Sequence[int]) -> int:
    """How many sequences go to the first micro-batch: the boundary (1 .. n-1) whose token counts differ least,
    the first such; 1 for a single sequence."""
    total = sum(seq_lens)
    gaps = [abs(2 * prefix - total) for prefix in itertools.accumulate(seq_lens[:-1])]
    return 1 + gaps.index(min(gaps)) if gaps else 1


def split_context(ctx: ForwardContext) -> list[MicroBatch]:
    """The step's two micro-batches (one if it cannot be split: one sequence, or all tokens on one side)."""
    if ctx.static is not None:
        raise ValueError("two-batch overlap splits a caller's step; this context is a captured graph's (static)")
    tensors = sorted(k for k, v in ctx.extra.items() if isinstance(v, torch.Tensor))
    if tensors:
        raise ValueError(f"two-batch overlap cannot tell which dimension of ctx.extra{tensors} holds tokens; pass "
                         f"per-token tensors as model arguments (with their token_dims), not in extra")
    k = split_point(ctx.seq_lens)
    first = sum(ctx.seq_lens[:k])
    if first in (0, ctx.num_tokens):
        return [MicroBatch(ctx, slice(0, ctx.num_tokens))]
    return [_micro_batch(ctx, slice(0, k), 0), _micro_batch(ctx, slice(k, len(ctx.seq_lens)), first)]


def _micro_batch(ctx: ForwardContext, seqs: slice, start: int) -> MicroBatch:
    lens = ctx.seq_lens[seqs]
    sub = ForwardContext(seq_lens=lens, context_lens=ctx.context_lens[seqs], slots=ctx.slots[seqs], cache=ctx.cache,
                         layer_kinds=ctx.layer_kinds, extra=dict(ctx.extra))
    return MicroBatch(sub, slice(start, start + sum(lens)))


def token_rows(x: torch.Tensor, dim: int, rows: slice, num_tokens: int, what: str) -> torch.Tensor:
    """`x`'s rows of one micro-batch along its token dimension `dim` (a view)."""
    if x.dim() == 0 or x.shape[dim] != num_tokens:
        raise ValueError(f"{what} has shape {tuple(x.shape)}: its token dim {dim} should hold the step's "
                         f"{num_tokens} tokens; give its token dimension in token_dims (mrope positions [3, T]: -1)")
    return x.narrow(dim, rows.start, rows.stop - rows.start)


def _padded(x: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    """`x` with `pad` zero rows after its tokens on dimension `dim` (token 0 at position 0: padding rows); an
    inference tensor only if `x` is one (Dynamo guards on it, as on `_local_rows`)."""
    shape = list(x.shape)
    shape[dim] = pad
    with torch.inference_mode(x.is_inference()):
        return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _local_rows(rows: torch.Tensor | None, part: slice) -> list[torch.Tensor]:
    """The step's logits rows as rows of one micro-batch's tokens, clamped into them ([] without logits rows); an
    inference tensor only if the caller's is (Dynamo guards on it: the model's other calls get the caller's kind)."""
    if rows is None:
        return []
    with torch.inference_mode(rows.is_inference()):
        return [(rows - part.start).clamp(0, part.stop - part.start - 1)]


def _pick_rows(outs: list[torch.Tensor], in_first: torch.Tensor, dim: int) -> torch.Tensor:
    """Each logits row from the micro-batch that holds it: the first where `in_first` [R], else the second."""
    shape = [1] * outs[0].dim()
    shape[dim] = -1
    return torch.where(in_first.view(shape), outs[0], outs[1])


def _check_own_backends(first, second) -> None:
    """Two instances compiled with one hattn.backend object get one compiled graph and runtime (the backend compiles
    a Dynamo graph once for both): their micro-batches, on two streams at once, would replay the same graphs over the
    same static inputs."""
    from hattn.compiler.backend import backend_object

    if second is None or second is first:
        return
    shared = backend_object(first)
    if shared is not None and shared is backend_object(second):
        raise ValueError(
            "two-batch overlap's two instances were compiled with one hattn.backend(...) object: they would share "
            "its graphs and static inputs while their micro-batches run at once. Fix: a backend per instance, e.g. "
            "compile=lambda m: torch.compile(m, backend=hattn.backend(mode=...))")


class TwoBatchOverlap:
    """`model(*args)` of a packed step, run as two micro-batches (`first` runs A, `second` runs B).

    args: per-token tensors, `token_dims[i]` the token dimension of args[i], then optionally `logits_rows` [R]; the
    outputs are concatenated along `out_dim` (logits [T, vocab]: 0), or with logits_rows hold those R rows along it.
    Call it under the step's forward context, like the model.
    """

    def __init__(self, first: Callable, second: Callable | None = None, token_dims: Sequence[int] = TOKEN_DIMS,
                 out_dim: int = 0):
        _check_own_backends(first, second)
        self.models = (first, first if second is None else second)
        self.token_dims, self.out_dim = tuple(token_dims), out_dim
        self._streams: dict[torch.device, tuple] = {}

    @property
    def hattn_config(self):
        """The hattn Config its micro-batches' models were compiled with (None: not by hattn); `generate` reads
        the capture sizes from it."""
        from hattn.compiler.backend import compiled_config

        return compiled_config(self.models[0])

    def __getattr__(self, name: str):
        """The model's own attributes (`layer_kinds`, `make_cache`, `cache_specs`, `config`, ...): generate checks
        each layer's route against the table and makes the cache from the model it is given."""
        if name == "models":  # not set yet (a copy being built)
            raise AttributeError(name)
        first = self.models[0]
        return getattr(getattr(first, "_orig_mod", first), name)

    @classmethod
    def for_model(cls, lm, compile: Callable | None = None, **kwargs) -> "TwoBatchOverlap":
        """Micro-batch A on `lm`, B on a replica whose collectives use a sibling group (a sharded `lm`; unsharded,
        B runs `lm` too); `compile` (e.g. torch.compile with a new hattn backend) is applied to each, so each has
        its own graphs. Every rank must call it in the same order (the sibling group is collective)."""
        tp, second = getattr(lm, "tp", None), lm
        if tp is not None:
            sibling = tp.sibling()
            sibling.warm_up(next(lm.parameters()).device)  # its communicator exists before any graph capture
            second = replica(lm, sibling)
        if compile is None:
            return cls(lm, second, **kwargs)
        return cls(compile(lm), compile(second), **kwargs)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        if ctx is None:
            raise ValueError("two-batch overlap splits the step its forward context describes; call it inside "
                             "hattn.forward_context(ForwardContext(seq_lens=...))")
        n = len(self.token_dims)
        if len(args) not in (n, n + 1):
            raise ValueError(f"got {len(args)} arguments but token_dims gives {n} token dimensions "
                             f"(and one optional logits_rows)")
        parts = split_context(ctx)
        if len(parts) == 1:
            return self.models[0](*args)
        rows = args[n] if len(args) > n else None
        if ctx.padding:  # the caller's padding rows are of no sequence: the micro-batches pad their own
            args = [token_rows(a, d, slice(0, ctx.num_tokens), ctx.num_tokens + ctx.padding, f"argument {i}")
                    for i, (a, d) in enumerate(zip(args[:n], self.token_dims))] + list(args[n:])
        inputs = [[token_rows(a, d, p.rows, ctx.num_tokens, f"argument {i}")
                   for i, (a, d) in enumerate(zip(args, self.token_dims))] + _local_rows(rows, p.rows) for p in parts]
        streams = self._streams_for(args[0].device)
        if streams is None:
            outs = [self._micro(m, p.ctx, x) for m, p, x in zip(self.models, parts, inputs)]
        else:
            outs = self._on_streams(streams, parts, inputs)
        if rows is None:
            return torch.cat(outs, self.out_dim)
        return _pick_rows(outs, rows < parts[1].rows.start, self.out_dim)

    def _micro(self, model: Callable, ctx: ForwardContext, args: list[torch.Tensor]) -> torch.Tensor:
        # a one-token micro-batch runs as two rows: Dynamo would give size 1 a graph of its own, and two micro-batches
        # of one token are the decode step of two sequences
        n, pad = len(self.token_dims), int(ctx.num_tokens == 1)
        if pad:
            args = [_padded(a, d, pad) for a, d in zip(args[:n], self.token_dims)] + list(args[n:])
            ctx = dataclasses.replace(ctx, padding=pad)
        # B's rows are a view at an offset (mrope positions [3, T] keep the step's row stride): Dynamo would trace
        # the offset or stride as a second dynamic size, and B's graph would run graph-free
        args = [plain_layout(a) for a in args[:n]] + list(args[n:])
        for a, d in zip(args, self.token_dims):
            if a.shape[d] > 1:  # one graph for every micro-batch size (Dynamo specializes 1)
                torch._dynamo.mark_dynamic(a, d % a.dim())
        with forward_context(ctx):
            out = model(*args)
        # every row returned (no logits rows): a graph-free run returns the padding rows too
        return out.narrow(self.out_dim, 0, ctx.num_tokens) if pad and len(args) == n else out

    def _streams_for(self, device: torch.device):
        """Two side streams on a CUDA device when the micro-batches have their own instances, else None."""
        if device.type != "cuda" or self.models[0] is self.models[1]:
            return None
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def _on_streams(self, streams, parts: list[MicroBatch], inputs) -> list[torch.Tensor]:
        """A on one stream, B on the other, both after the caller's stream; the caller's stream waits for both."""
        main = torch.cuda.current_stream()
        outs = []
        for model, part, args, stream in zip(self.models, parts, inputs, streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(self._micro(model, part.ctx, args))
            for a in args:  # made on the caller's stream, read on this one: not freed before it is done
                a.record_stream(stream)
        for stream, out in zip(streams, outs):
            main.wait_stream(stream)
            out.record_stream(main)
        return outs

"""What hattn's tokens are checked against: the unmodified transformers model's own greedy generation.

`hf_greedy` runs HF's `generate` (its own cache, its own attention) one prompt at a time, keeping each step's
top-1 - top-2 logit margin; `check_tokens` compares hattn's tokens with it, allowing a divergence only where HF
itself was at a near-tie (low-precision runs may legitimately pick the other token there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Reference:
    tokens: list[list[int]]     # greedy new tokens per prompt
    margins: list[list[float]]  # top-1 minus top-2 logit at each step
    ulps: list[list[float]] | None = None  # the spacing of the logits' dtype at the top-1 logit, at each step


def hf_greedy(hf_model, prompts: list[list[int]], max_new_tokens: int) -> Reference:
    """HF eager greedy decoding of each prompt alone (no padding), with its own cache. HF stops early at the
    config's eos token; pass it as a stop token to hattn's generate to compare like with like."""
    device = next(hf_model.parameters()).device
    tokens, margins, ulps = [], [], []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        with torch.inference_mode():  # the mask says every id is the prompt's: without it, transformers masks out
            out = hf_model.generate(  # each id equal to pad_token_id as padding, and generates for another input
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                output_scores=True, return_dict_in_generate=True, pad_token_id=0,
            )
        tokens.append(out.sequences[0, len(p):].tolist())
        top2 = [s[0].float().topk(2).values for s in out.scores]
        margins.append([float(v[0] - v[1]) for v in top2])
        ulps.append([_ulp(float(v[0]), s.dtype) for v, s in zip(top2, out.scores)])
    return Reference(tokens, margins, ulps)


def _ulp(x: float, dtype: torch.dtype) -> float:
    """The gap between |x| and the next larger value of dtype (bf16 near 20: 0.125)."""
    if not dtype.is_floating_point or x == 0:
        return 0.0
    info = torch.finfo(dtype)
    return info.eps * 2.0 ** math.floor(math.log2(max(abs(x), info.tiny)))


def check_tokens(ref: Reference, got: list[list[int]], tie: float = 0.0) -> tuple[bool, str]:
    """(ok, note): every sequence equals the reference, or first differs at a step whose HF margin is <= tie or
    at most one step of the logits' dtype there (the top two logits were neighbouring values: a tie)."""
    notes = []
    ulps = ref.ulps or [[0.0] * len(m) for m in ref.margins]
    for i, (want, have, margin, ulp) in enumerate(zip(ref.tokens, got, ref.margins, ulps)):
        if want == have:
            continue
        step = next((k for k, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
        if step < len(margin) and margin[step] <= max(tie, ulp[step]):
            notes.append(f"seq {i} diverges at a near-tie (step {step}, margin {margin[step]:.3g})")
            continue
        where = f"step {step}" + (f" (HF margin {margin[step]:.3g})" if step < len(margin) else "")
        return False, f"seq {i} differs from HF eager at {where}: HF {want[step:step + 4]} vs {have[step:step + 4]}"
    return True, "; ".join(notes) or "equal to HF eager"

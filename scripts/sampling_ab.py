"""What choosing the next tokens costs a decode step, per sampling setting, on random logits of the model's vocabulary.

    python3 scripts/sampling_ab.py [--device cuda] [--vocab 248320] [--batches 1,16,64] [--reps 50]

`hattn.models.sampling.Sampler` (as generate calls it once a step) on bf16 logits [B, vocab], ms median of --reps
calls (CUDA events after a sync on a GPU: the host's work counts, as in a decode step that waits for its tokens), for
greedy, transformers' default sampling (top_k 50), top_k + top_p (a full sort of the vocabulary, and top_p over
top_k's survivors, `sampling.TOP_P_AFTER_TOP_K_MIN_ROWS`), top_p alone (a full sort),
and a repetition penalty + no_repeat_ngram_size on greedy; the settings with top_k also through the sampling kernel
(`hattn.kernels.sampling`, "kernel": what generate runs on CUDA) against the torch path. Set against a decode step's
time (the bench's decode rows) this says what sampling adds to a step.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from hattn.bench.harness import Clock
from hattn.models import sampling
from hattn.models.sampling import Sampler, SamplingParams

MIN_ROWS = sampling.TOP_P_AFTER_TOP_K_MIN_ROWS  # the default, for the settings that do not choose
SETTINGS = {
    "greedy": {},
    "top_k 50": dict(temperature=1.0, top_k=50),
    "top_k 50 (kernel)": dict(temperature=1.0, top_k=50, kernel=True),
    "top_k 50, top_p 0.95 (sort)": dict(temperature=0.7, top_k=50, top_p=0.95, min_rows=10**9),
    "top_k 50, top_p 0.95 (survivors)": dict(temperature=0.7, top_k=50, top_p=0.95, min_rows=0),
    "top_k 50, top_p 0.95 (kernel)": dict(temperature=0.7, top_k=50, top_p=0.95, kernel=True),
    "top_k 20, top_p 0.8 (kernel)": dict(temperature=0.7, top_k=20, top_p=0.8, kernel=True),
    "top_k 256, top_p 0.95 (kernel)": dict(temperature=0.7, top_k=256, top_p=0.95, kernel=True),
    "top_p 0.95": dict(temperature=0.7, top_p=0.95),
    "greedy, penalty 1.1, 3-grams": dict(repetition_penalty=1.1, no_repeat_ngram_size=3),
}


def time_setting(setting: dict, batch: int, vocab: int, device, reps: int, clock: Clock) -> float:
    setting = dict(setting)
    sampling.TOP_P_AFTER_TOP_K_MIN_ROWS = setting.pop("min_rows", MIN_ROWS)
    sampling.fused_sampling = setting.pop("kernel", False)
    params = SamplingParams(max_new_tokens=reps + 2, seed=0, **setting)
    prompts = [list(range(i, i + 16)) for i in range(batch)]
    generator = torch.Generator(device=device).manual_seed(0) if params.temperature else None
    sampler = Sampler(params, prompts, generator)
    logits = torch.randn(batch, vocab, device=device).to(torch.bfloat16) * 3
    sampler(logits)  # the first call makes the sampler's state (penalty mask, n-gram buffer)
    return statistics.median(clock.time_ms(lambda: sampler(logits)) for _ in range(reps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", type=int, default=248320)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    clock = Clock(args.device)
    print(f"device {args.device} ({torch.cuda.get_device_name() if clock.cuda else 'cpu'}), vocab {args.vocab}, "
          f"ms per call (median of {args.reps})")
    print(f"{'setting':32s}" + "".join(f"{'B=' + str(b):>10s}" for b in batches))
    for name, setting in SETTINGS.items():
        times = [time_setting(setting, b, args.vocab, args.device, args.reps, clock) for b in batches]
        print(f"{name:32s}" + "".join(f"{t:10.3f}" for t in times))


if __name__ == "__main__":
    main()

"""What each rank runs for the tensor-parallel tests: a tiny family at TP=1 (the reference), then sharded over the
group, uncompiled and compiled in a graph mode, each with and without two-batch overlap. Returns plain numbers
and token lists (the parent process asserts).

On CPU the graph mode runs graph-free and the overlap shares the one compiled model; on a GPU it captures graphs
and the overlap is the real one: two compiled instances, the second on a sibling group, on two streams."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hattn.compiler.backend import backend
from hattn.context import ForwardContext, forward_context
from hattn.models.generate import SamplingParams, generate, run_step
from hattn.models.hf import adapt
from hattn.models.presets import TINY_FAMILIES, preset_config, random_model
from hattn.parallel import shard
from hattn.parallel.overlap import TwoBatchOverlap

TINY_PRESETS = list(TINY_FAMILIES)
PROMPT_LENS = (5, 17, 9, 6)  # the overlap splits prefill 22 | 15 tokens and decode 2 | 2: no one-token graph
NEW_TOKENS = 8
COLLECTIVES = ("all_reduce", "all_gather_into_tensor")
# all-reduces per forward: one per mixer and one per MLP/MoE block (4 layers; Nemotron-H: 6 blocks of one each;
# Granite 4.0-H: an MoE block and a shared MLP a layer), plus one per norm that spans every head (OLMo's full
# layer: q and k norms; MiniMax: 3 lightning layers' norms)
ALL_REDUCES = {"tiny": 8, "tiny-qwen3-next": 8, "tiny-olmo-hybrid": 8 + 2, "tiny-kimi-linear": 8,
               "tiny-bailing-hybrid": 8, "tiny-minimax": 8 + 3, "tiny-nemotron-h": 6, "tiny-granite-4.0-h": 12,
               "tiny-bamba": 8, "tiny-lfm2": 12}


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def run_model(model, lm, prompts) -> dict:
    """Logits of a packed prefill and of the decode step after it, and greedy tokens, over a fresh cache."""
    lens, kinds = [len(p) for p in prompts], lm.layer_kinds
    cache = lm.make_cache(len(prompts), max(lens) + NEW_TOKENS)
    slots, device = list(range(len(prompts))), cache.device
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    pos = torch.cat([torch.arange(n) for n in lens]).to(device)
    prefill = run_step(model, ForwardContext(lens, [0] * len(lens), slots, cache, kinds), ids, pos)
    nxt = prefill[torch.tensor(lens, device=device).cumsum(0) - 1].argmax(-1)
    decode = run_step(model, ForwardContext([1] * len(lens), lens, slots, cache, kinds), nxt,
                      torch.tensor(lens, device=device))
    tokens = generate(model, prompts, cache, SamplingParams(max_new_tokens=NEW_TOKENS), layer_kinds=kinds).tokens
    return {"prefill": prefill.float().cpu(), "decode": decode.float().cpu(), "tokens": tokens}


class CountCollectives(TorchDispatchMode):
    """Counts the collectives dispatched under it, by name."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, name = func.overloadpacket._qualified_op_name.split("::")
        if ns == "_c10d_functional" and name in COLLECTIVES:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _collectives_per_step(lm, prompts, device) -> dict[str, int]:
    ids = torch.tensor(prompts[0], device=device)
    with CountCollectives() as count, forward_context(ForwardContext([len(ids)])), torch.inference_mode():
        lm(ids, torch.arange(len(ids), device=device))
    return count.calls


def _variants(lm, mode: str, device: str) -> tuple[dict, list]:
    """name -> step model, and the backends of the compiled ones."""
    backends = []

    def compiled(module):
        backends.append(backend(mode=mode, inner_compiler="eager" if device == "cpu" else "inductor",
                                capture_sizes=[1, 2, 4, 8, 16, 32, 64], progress=False))
        return torch.compile(module, backend=backends[-1])

    one = compiled(lm)
    overlap = TwoBatchOverlap(one) if device == "cpu" else TwoBatchOverlap.for_model(lm, compile=compiled)
    return {"eager": lm, "eager+tbo": TwoBatchOverlap.for_model(lm), mode: one, f"{mode}+tbo": overlap}, backends


def family(tp, preset: str, device: str = "cpu", mode: str = "pcg") -> dict:
    """One family: TP=1 reference, then the sharded model's variants compared with it (fp32)."""
    torch._dynamo.reset()  # one compiled model per family: Dynamo's per-function recompile limit is shared
    lm = adapt(random_model(preset_config(preset), seed=0, device=device))
    prompts = prompts_for(lm.config.vocab_size)
    ref = run_model(lm, lm, prompts)
    full_cache = lm.make_cache(4, 32).nbytes()
    shard(lm, tp)
    out = {"cache_ratio": lm.make_cache(4, 32).nbytes() / full_cache,
           "collectives": _collectives_per_step(lm, prompts, device), "ref_tokens": ref["tokens"]}
    models, backends = _variants(lm, mode, device)
    for name, model in models.items():
        got = run_model(model, lm, prompts)
        out[name] = {"prefill_diff": (got["prefill"] - ref["prefill"]).abs().max().item(),
                     "decode_diff": (got["decode"] - ref["decode"]).abs().max().item(), "tokens": got["tokens"]}
    out["graph_stats"] = [be.stats.as_dict() for be in backends]
    return out


def all_families(tp) -> dict:
    return {preset: family(tp, preset) for preset in TINY_PRESETS}


def gpu_families(tp, presets: list[str], mode: str) -> dict:
    return {preset: family(tp, preset, f"cuda:{tp.rank}", mode) for preset in presets}


def agreement(tp) -> dict:
    """What each rank gets from the checks that keep ranks in step (found by a review): a TPGroup that misstates
    its rank or size, samples drawn without a seed while each rank's global generator differs, and prompts that
    differ between ranks."""
    import torch.distributed as dist

    from hattn.models.presets import load
    from hattn.parallel import TPGroup

    errors = {}
    for name, rank, size in (("rank", 1 - tp.rank, 2), ("size", tp.rank, 3)):
        try:
            TPGroup(rank, size, dist.group.WORLD)
        except ValueError as e:
            errors[name] = str(e)
    lm = shard(load("tiny"), tp)
    torch.manual_seed(1000 + tp.rank)  # each process's own global generator
    unseeded = SamplingParams(max_new_tokens=6, temperature=1.0)
    tokens = generate(lm, [[1, 2, 3, 4, 5]], params=unseeded).tokens
    try:
        generate(lm, [[1, 2, 3 + tp.rank]], params=SamplingParams(max_new_tokens=2))
    except ValueError as e:
        errors["prompts"] = str(e)
    try:  # a prompt only one rank's checks would refuse: every rank fails at the agreement, none waits
        generate(lm, [[1, 2, 3 if tp.rank == 0 else 10**9]], params=SamplingParams(max_new_tokens=2))
    except ValueError as e:
        errors["bad prompt"] = str(e)
    # greedy calls draw nothing from the global generator: prompts drawn from it stay alike on every rank
    torch.manual_seed(0)
    greedy = [generate(lm, [torch.randint(0, 512, (6,)).tolist()], params=SamplingParams(max_new_tokens=3)).tokens
              for _ in range(2)]
    # equal settings of other Python types are one request
    import numpy as np

    temperature = 1 if tp.rank == 0 else np.float64(1.0)
    typed = generate(lm, [[1, 2, 3]], params=SamplingParams(max_new_tokens=2, temperature=temperature, seed=3)).tokens
    return {"tokens": tokens, "errors": errors, "greedy": greedy, "typed": typed}

"""Tensor parallelism: shard an adapted model (`hattn.models.hf.HybridLM`) over a process group, in place.

    tp = TPGroup.of()                  # after torch.distributed.init_process_group (torchrun: hattn.parallel.launch)
    lm = shard(adapt(hf_model), tp)    # every rank starts from the same full weights; keeps its share
    cache = lm.make_cache(...)         # local heads only
    generate(torch.compile(lm, backend=hattn.backend(mode="pcg")), prompts, cache)   # the same on every rank

Full attention and every mixer kind are sharded by heads, MLPs and MoE blocks column- then row-parallel, the LM
head by vocabulary (`plans.py`); each row-parallel output is all-reduced once, the logits all-gathered, so every
rank holds the same full logits and samples the same tokens. Split ops run per rank on its local heads: the
module's head counts are the local ones and the cache is built from a *local config* (the family's config with
its head counts divided by tp), through the family's own `cache_specs`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools

import torch
import torch.distributed as dist

from hattn.models.hf import HybridLM, _decoder_layers, family_of, text_config
from hattn.models.sampling import SamplingParams
from hattn.parallel.group import TPGroup
from hattn.parallel.layers import vocab_parallel_head
from hattn.parallel.plans import Plan, check_mlp, mlp_block, plan_of


def local_config(config, heads: tuple[str, ...], size: int):
    """A copy of `config` whose head counts `heads` are divided by `size` (head_dim pinned first: families derive
    it from hidden_size // num_attention_heads when the config has none)."""
    bad = [f"{name}={getattr(config, name)}" for name in heads if getattr(config, name) % size]
    if bad:
        raise ValueError(f"{config.model_type}: {', '.join(bad)} do not divide over tp={size} ranks (tensor "
                         f"parallelism shards whole heads); use a --tp that divides them")
    local = copy.deepcopy(config)
    local.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for name in heads:
        setattr(local, name, getattr(config, name) // size)
    return local


def check_config(config, size: int):
    """The local config of `config` over `size` ranks; ValueError for a family without a plan, head counts or a
    vocabulary that do not divide (what `shard` and the CLI's --tp check first, from the config alone)."""
    config = text_config(config)  # a multimodal checkpoint's config (Qwen3.5) holds the text model's
    local = local_config(config, plan_of(family_of(config).name).heads, size)
    if config.vocab_size % size:
        raise ValueError(f"vocab_size={config.vocab_size} does not divide over tp={size} ranks (the LM head is "
                         f"sharded by vocabulary); use a --tp that divides it")
    return local


def check_same_weights(lm: HybridLM, tp: TPGroup) -> None:
    """Every rank must shard the same full weights (same seed or checkpoint): a float64 fingerprint of each
    parameter (sum, sum of magnitudes) is gathered and compared."""
    params = list(lm.parameters())
    mine = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in params]).flatten()
    every = [torch.empty_like(mine) for _ in range(tp.size)]
    dist.all_gather(every, mine, group=tp.group)
    for rank, theirs in enumerate(every):
        if not torch.allclose(theirs, mine, rtol=1e-9, atol=0.0):
            i = int((theirs - mine).abs().argmax()) // 2
            name = next(itertools.islice((n for n, _ in lm.named_parameters()), i, None))
            raise ValueError(f"rank {rank} holds other weights than rank {tp.rank} (first difference: {name}); "
                             f"build the model from the same seed or checkpoint on every rank")


def _check_mlps(lm: HybridLM, plan: Plan, size: int) -> None:
    """Every layer's MLP or MoE block shards over `size` ranks (checked before any layer changes)."""
    for i, layer in enumerate(_decoder_layers(lm.hf)):
        for mlp in plan.mlps(layer):
            problem = check_mlp(mlp, f"layer {i}'s {type(mlp).__name__}", size)
            if problem is not None:
                raise ValueError(f"{lm.family}: {problem}; use a --tp that divides it (tensor parallelism shards "
                                 f"the MLPs on their intermediate dimension)")


def _shard_layers(lm: HybridLM, plan: Plan, tp: TPGroup) -> None:
    family = family_of(lm.config)
    unsharded = sorted(set(lm.layer_kinds.values()) - set(plan.mixers))
    if unsharded:
        raise ValueError(f"{lm.family}: layers of kind {unsharded} are not yet sharded for tensor parallelism; "
                         f"run with --tp 1")
    for i, layer in enumerate(_decoder_layers(lm.hf)):
        kind = lm.layer_kinds.get(i)
        if kind is not None:
            plan.mixers[kind](family.mixer(layer, kind), tp)
        for mlp in plan.mlps(layer):
            mlp_block(mlp, tp)


def shard(lm: HybridLM, tp: TPGroup, check_weights: bool = True) -> HybridLM:
    """Shard `lm` in place over `tp` and return it (unchanged for a group of one).

    Raises ValueError before changing anything for a family without a plan, head counts, a vocabulary or an
    MLP's intermediate size that do not divide by tp.size (or MoE experts' per-rank rows not 16-byte aligned), or
    (check_weights) ranks whose full weights differ.
    """
    if getattr(lm, "tp", None) is not None:
        raise ValueError("this model is already sharded; shard a freshly adapted model")
    if tp.size == 1:
        return lm
    plan = plan_of(lm.family)
    local = check_config(lm.config, tp.size)
    _check_mlps(lm, plan, tp.size)
    if check_weights:
        check_same_weights(lm, tp)
    _shard_layers(lm, plan, tp)
    vocab_parallel_head(lm.hf.lm_head, tp)
    lm.set_cache_specs(family_of(lm.config).cache_specs(local))
    lm.tp = tp
    return lm


def replica(lm: HybridLM, tp: TPGroup) -> HybridLM:
    """A second HybridLM over the same parameters and buffers (no copy) whose collectives run over `tp` (e.g.
    `lm.tp.sibling()`): two-batch overlap runs one micro-batch on each, so their all-reduces use two
    communicators, and each gets its own compiled graphs and static buffers."""
    if getattr(lm, "tp", None) is None:
        raise ValueError("replica() takes a sharded model (hattn.parallel.shard)")
    memo = {id(t): t for t in itertools.chain(lm.parameters(), lm.buffers())}
    memo[id(lm.tp)] = tp
    return copy.deepcopy(lm, memo)


def agree_on_request(tp: TPGroup, prompts, params, device):
    """The SamplingParams every rank of a sharded model generates with, after checking that all ranks were given
    the same prompts and settings. Each step all-reduces the ranks' hidden states, so ranks that feed different
    tokens mix two sequences with no error: other prompts, or samples drawn without a seed from each process's own
    global generator. Sampling params without a seed get the one rank 0 draws from its global generator (every rank
    draws one, so the ranks' generators stay alike). Called before generate checks its inputs, so that every rank
    checks the same ones and fails alike. One all-gather of two int64s a generate call."""
    if tp.size == 1:
        return params
    sampling = (isinstance(params, SamplingParams) and params.seed is None
                and isinstance(params.temperature, (int, float)) and params.temperature > 0)
    seed = int(torch.randint(0, 2**62, ()).item()) if sampling else None
    digest = hashlib.sha256(_request_key(prompts, params).encode()).digest()
    mine = torch.tensor([int.from_bytes(digest[:8], "little", signed=True), seed or 0], dtype=torch.long,
                        device=device)
    every = [torch.empty_like(mine) for _ in range(tp.size)]
    dist.all_gather(every, mine, group=tp.group)
    differ = [rank for rank, theirs in enumerate(every) if theirs[0] != every[0][0]]
    if differ:
        raise ValueError(f"rank(s) {differ} of the tensor-parallel group were given other prompts or sampling "
                         f"settings than rank 0: every rank must call generate with the same prompts and params")
    return dataclasses.replace(params, seed=int(every[0][1])) if sampling else params


def _request_key(prompts, params) -> str:
    """A text equal on two ranks exactly when their requests are: numbers by value (1 and 1.0, numpy's and
    Python's), anything that is not a list of int lists or not SamplingParams by its repr."""
    try:
        rows = [[int(t) for t in p] for p in prompts]
        settings = sorted((f.name, _value(getattr(params, f.name))) for f in dataclasses.fields(params))
        return repr((rows, settings))
    except (TypeError, ValueError):
        return repr((prompts, params))


def _value(x):
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, (tuple, list)):
        return tuple(_value(v) for v in x)
    return float(x)  # ints and floats of any type: by value

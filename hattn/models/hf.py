"""Adapters that make an unmodified transformers hybrid model call hattn's split ops.

    lm = hattn.models.hf.adapt(AutoModelForCausalLM.from_config(config))   # -> HybridLM
    logits = lm(input_ids, positions)                                       # [T] packed tokens -> [T, vocab]

- Full-attention modules keep their code: the model's attention implementation is set to "hattn", a transformers
  `AttentionInterface` function that packs `[1, H, T, D]` into `[T, H, D]` and calls `hattn::full_attention`
  (which writes K/V into *our* cache, so the HF model runs with `use_cache=False`).
- Linear-attention / mixer modules get a family's forward (the module's class is swapped for a subclass that only
  overrides `forward`; parameters stay where they are): projections, norms and gates run as before, only the
  batch-dependent core is the split op.
- Layer kinds come from the config (`layer_types` or the family's equivalent), never from a module's class: the
  adapter patches layer i as the kind the config gives it, and every split-op call is cross-checked against the
  same table (`registry.check_route`), so a mismatch is an error (peers that decided a layer's kind from its
  module's class routed layers to the wrong backend).
- The adapted HF model can no longer be used the transformers way with transformers' cache (its attention writes
  hattn's cache, not `past_key_values`): its own `generate`, `use_cache=True`, a cache passed in, a batch > 1 and a
  padding mask raise `AdaptedModelError` naming what to call instead (`guard_hf_calls`). A single `[1, T]` forward
  still gives transformers' logits.

A family is one file in hattn/models/families/ that calls `register_family(Family(...))`.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hattn.ops  # noqa: F401  (defines torch.ops.hattn.*)
from hattn.context import ForwardContext, LayerSpec, forward_context
from hattn.counters import Stats, register
from hattn.models.activations import share_activations
from hattn.models.cache import HybridCache
from hattn.ops import full
from hattn.registry import split_op_of

ATTN_IMPLEMENTATION = "hattn"


# -- full attention: a transformers AttentionInterface function --------------------------------------------------
def hattn_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """query: [1, Hq, T, Dk]; key: [1, Hkv, T, Dk]; value: [1, Hkv, T, Dv] -> ([1, T, Hq, Dv], None).

    The mask is ignored: sequences are packed along T and the forward context says where each starts.
    """
    if not getattr(module, "_hattn_adapted", False):
        raise AdaptedModelError(
            f"{type(module).__name__} runs hattn's attention but belongs to a model hattn did not adapt: it shares "
            f"its config object with an adapted model (AutoModelForCausalLM.from_config(config) twice with one "
            f"config), whose attention implementation adapt set to {ATTN_IMPLEMENTATION!r}. Build each model from "
            f"its own config (copy.deepcopy(config)), or adapt this one too"
        )
    if query.shape[0] != 1:
        raise ValueError(
            f"hattn packs sequences along the token dimension: call the model with batch size 1 (input [1, T]), "
            f"got batch {query.shape[0]}"
        )
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [T, H, D]
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
    torch.ops.hattn.full_attention(q, k, v, out, module.layer_idx, scale)
    return out[None], None


def register_attention() -> None:
    """Register "hattn" as a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, hattn_attention)


# -- families ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """How hattn runs one transformers model family.

    model_types   config.model_type values served (e.g. ("qwen3_5_text",))
    layer_kinds   config -> {layer id: split-op kind}; layers without a mixer are absent
    cache_specs   config -> {layer id: LayerSpec}
    forwards      kind -> replacement `forward(self, hidden_states, ...)` for mixer modules of that kind
                  (full attention needs none: it goes through the attention interface)
    mixer         (decoder layer, kind) -> the layer's mixer module, found by attribute name
    check         config -> None, raises for configs the adapter cannot serve (optional)
    """

    name: str
    model_types: tuple[str, ...]
    layer_kinds: Callable[[object], dict[int, str]]
    cache_specs: Callable[[object], dict[int, LayerSpec]]
    forwards: dict[str, Callable]
    mixer: Callable[[nn.Module, str], nn.Module | None]
    check: Callable[[object], None] = field(default=lambda config: None)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for t in family.model_types:
        other = FAMILIES.get(t)
        if other is not None and other.name != family.name:
            raise ValueError(f"model_type {t!r} is already served by family {other.name!r}")
        FAMILIES[t] = family
    return family


def family_of(config) -> Family:
    import hattn.models.families  # noqa: F401  (registers every family)

    family = FAMILIES.get(config.model_type)
    if family is None:
        known = sorted({f.name for f in FAMILIES.values()})
        raise ValueError(
            f"hattn has no adapter for model_type {config.model_type!r}; supported families: {known}. "
            f"Add one file in hattn/models/families/ that calls register_family."
        )
    return family


def kinds_from_layer_types(config, linear_kind: str = "linear", key: str = "layer_types",
                           names: dict[str, str] | None = None) -> dict[int, str]:
    """`names` ({"full_attention": "full", "linear_attention": linear_kind} by default) over `config.<key>`; other
    types are an error."""
    names = names or {"full_attention": "full", "linear_attention": linear_kind}
    types = getattr(config, key, None)
    if types is None:
        raise ValueError(f"{config.model_type} config has no {key}; hattn needs the per-layer kinds")
    unknown = sorted(set(types) - set(names))
    if unknown:
        raise ValueError(f"{config.model_type}: layer types {unknown} are not served by hattn (known: {sorted(names)})")
    return {i: names[t] for i, t in enumerate(types)}


def check_silu(config, key: str = "hidden_act") -> None:
    """hattn's conv kernels apply SiLU: a config whose short conv applies another activation (`config.<key>`) is
    refused."""
    act = getattr(config, key)
    if act not in ("silu", "swish"):
        raise ValueError(f"{config.model_type}: hattn's conv1d applies silu but the config's {key} is {act!r}")


def gqa_full_spec(config) -> LayerSpec:
    """KV cache spec of a plain GQA attention layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return full.cache_spec(config.num_key_value_heads, head_dim)


def text_config(config):
    """The text config of a multimodal config (Qwen3.5's `text_config`), else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# -- patching ------------------------------------------------------------------------------------------------------
_PATCHED: dict[tuple[type, Callable], type] = {}


def _patched_class(cls: type, forward: Callable) -> type:
    key = (cls, forward)
    if key not in _PATCHED:
        _PATCHED[key] = type(f"Hattn{cls.__name__}", (cls,), {"forward": forward, "_hattn_base": cls})
    return _PATCHED[key]


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        hint = ""
        if getattr(base, "language_model", None) is not None:  # transformers' vision-language models
            hint = (": this is a multimodal model; load its language model with AutoModelForCausalLM."
                    "from_pretrained(path) (transformers builds the text-only causal LM from the same checkpoint) "
                    "and compile that")
        raise ValueError(f"{type(model).__name__} has no .model.layers ModuleList; hattn adapts decoder-only "
                         f"LMs{hint}")
    return layers


def _patch_layers(model: nn.Module, family: Family, kinds: dict[int, str]) -> None:
    layers = _decoder_layers(model)
    if max(kinds, default=-1) >= len(layers):
        raise ValueError(f"the config gives kinds for {max(kinds) + 1} layers but the model has {len(layers)}")
    for i, kind in sorted(kinds.items()):
        module = family.mixer(layers[i], kind)
        if module is None:
            raise ValueError(
                f"{family.name}: the config says layer {i} is a {kind!r} layer but the layer has no {kind!r} mixer "
                f"({type(layers[i]).__name__}); the config's layer types disagree with the model"
            )
        if getattr(module, "layer_idx", i) != i:
            raise ValueError(f"{family.name}: layer {i}'s mixer has layer_idx {module.layer_idx}; expected {i}")
        if kind == "full":
            continue
        if kind not in family.forwards:
            raise ValueError(f"{family.name} has no forward for {kind!r} layers (has: {sorted(family.forwards)})")
        base = getattr(type(module), "_hattn_base", type(module))
        module.__class__ = _patched_class(base, family.forwards[kind])


def _set_attention(model: nn.Module) -> None:
    """Route the model's full attention to hattn's (its config's attention implementation), and mark its modules as
    adapted: a model sharing the config object runs hattn's attention too, which then refuses it."""
    register_attention()
    for module in model.modules():
        module._hattn_adapted = True
    for config in {id(c): c for c in (model.config, text_config(model.config))}.values():
        config._attn_implementation = ATTN_IMPLEMENTATION


# -- what the adapted HF model refuses ------------------------------------------------------------------------------
class AdaptedModelError(RuntimeError):
    """The adapted transformers model was called in a way that would give wrong tokens (see `guard_hf_calls`)."""


_USE_INSTEAD = ("generate with hattn.compile(model).generate(input_ids, attention_mask=..., max_new_tokens=...), or "
                "pack prompts yourself: hattn.generate(hattn.adapt(model), prompts, params=hattn.SamplingParams(...))")
_CACHE_KWARGS = ("cache", "past_key_values")


def _refuse_generate(*args, **kwargs):
    raise AdaptedModelError(
        "this model was adapted by hattn: its attention and mixers now read and write hattn's cache, so "
        "transformers' own generate (with its own cache) would give wrong tokens after the first. Instead, "
        f"{_USE_INSTEAD}"
    )


def _check_hf_call(names: list[str], args: tuple, kwargs: dict) -> None:
    """Raise AdaptedModelError for a forward of the adapted base model that hattn's split ops cannot serve."""
    given = {**dict(zip(names, args)), **kwargs}
    if given.get("use_cache") or any(given.get(k) is not None for k in _CACHE_KWARGS):
        raise AdaptedModelError(
            "use_cache=True / a transformers cache: this model was adapted by hattn, whose attention writes hattn's "
            "cache, not transformers' (a cache fed back would give wrong tokens). Call the model with "
            f"use_cache=False (one [1, T] forward gives transformers' logits), or {_USE_INSTEAD}"
        )
    if given.get("output_attentions"):
        raise AdaptedModelError(
            "output_attentions=True: this model was adapted by hattn, whose attention kernels never form the "
            "attention weights (transformers would return none, silently). Call the model without "
            "output_attentions, or the unadapted model for the weights"
        )
    tokens = given.get("input_ids") if given.get("input_ids") is not None else given.get("inputs_embeds")
    if tokens is not None and tokens.shape[0] != 1:
        raise AdaptedModelError(
            f"a forward of a hattn-adapted model takes one packed sequence [1, T], got a batch of {tokens.shape[0]} "
            f"(hattn packs sequences along T and a forward context says where each starts). For a padded batch, "
            f"{_USE_INSTEAD}"
        )
    mask = given.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        raise AdaptedModelError(
            f"attention_mask has padding (zeros): hattn's attention ignores the mask, so padding would be attended "
            f"to. Drop the padding, or {_USE_INSTEAD}"
        )


def guard_hf_calls(hf_model: nn.Module) -> None:
    """Make the adapted `hf_model` refuse what would silently give wrong tokens (idempotent).

    Its `generate` raises; a forward of its base model (also reached through the LM head model) with use_cache=True,
    a transformers cache, a batch > 1 or a padding mask raises; `use_cache` left unset means False.
    """
    hf_model.generate = _refuse_generate  # an instance attribute shadows GenerationMixin.generate
    base = getattr(hf_model, "model", hf_model)
    if getattr(base, "_hattn_guarded", False):
        return
    names = list(inspect.signature(base.forward).parameters)  # here, not in the hook: Dynamo traces the hook
    # a module-level function: the adapted model stays picklable (torch.save(model))
    base.register_forward_pre_hook(functools.partial(_checked_hf_call, names), with_kwargs=True)
    base._hattn_guarded = True


def _checked_hf_call(names: list[str], module, args, kwargs):
    """guard_hf_calls' pre-hook of the base model's forward (its parameter names first)."""
    _check_hf_call(names, args, kwargs)
    if "use_cache" in names[len(args):]:
        kwargs["use_cache"] = False
    return args, kwargs


class HybridLM(nn.Module):
    """An adapted HF causal LM: `forward(input_ids [T], positions [T], logits_rows [R] = None) -> logits`.

    Sequences are packed along T; the forward context (seq_lens, context_lens, slots, cache, layer_kinds) says
    where each starts and which cache slot it uses. Without a context the input is one sequence with no cache.
    Logits are [T, vocab], or [R, vocab] for the rows `logits_rows` names (the LM head runs on those rows only:
    each sequence's last token in a prefill). Keep R fixed (e.g. the cache's slot count, padded with any valid row):
    a new R is a new graph for Dynamo.
    """

    def __init__(self, hf_model: nn.Module, family: Family, layer_kinds: dict[int, str]):
        super().__init__()
        self.hf = hf_model
        self.training = hf_model.training  # the wrapper's mode is its model's (the dispatcher reads the root's)
        self.family = family.name
        self.layer_kinds = dict(layer_kinds)
        self._text_config = (hf_model.config, text_config(hf_model.config))
        self._specs = family.cache_specs(self._text_config[1])

    @property
    def config(self):
        """The text config (transformers' get_text_config takes ~12 us: found once, again if hf.config is replaced;
        its attributes are read live, so a resized vocabulary shows)."""
        hf_config, text = self._text_config
        return text if self.hf.config is hf_config else text_config(self.hf.config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        # also ties the two sizes under Dynamo: families without rotary embeddings never relate positions to the
        # tokens, and two dynamic sizes would leave graph modes graph-free
        if positions.shape != input_ids.shape:
            raise ValueError(f"positions has shape {tuple(positions.shape)} but input_ids {tuple(input_ids.shape)}: "
                             f"pass one position per token")
        if self.config._attn_implementation != ATTN_IMPLEMENTATION:  # a guard under Dynamo, not a per-call cost
            raise AdaptedModelError(
                f"the model's attention implementation is {self.config._attn_implementation!r}, not hattn's "
                f"{ATTN_IMPLEMENTATION!r} (set after hattn adapted the model?): its attention layers would not read "
                f"or write hattn's cache and would give wrong tokens. Leave config._attn_implementation as adapt set "
                f"it, or adapt the model again (hattn.adapt / hattn.compile)")
        # transformers: 0 keeps every row, a 1-D tensor those rows. Clamped: a graph runtime captures smaller token
        # counts with the caller's rows, which may point past them there (a real call's rows are all < T)
        keep = 0 if logits_rows is None else logits_rows.clamp(max=input_ids.shape[0] - 1)
        out = self.hf(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False,
                      logits_to_keep=keep)
        return out.logits[0]

    def cache_specs(self) -> dict[int, LayerSpec]:
        return dict(self._specs)

    def set_cache_specs(self, specs: dict[int, LayerSpec]) -> None:
        """Replace what `make_cache` allocates per layer (tensor parallelism: each rank caches its local heads)."""
        new, old = ({i: s.kind for i, s in d.items()} for d in (specs, self._specs))
        if new != old:
            raise ValueError(f"new cache specs must keep every layer and its kind: got {new}, the model has {old}")
        self._specs = dict(specs)

    def make_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> HybridCache:
        """A HybridCache for `slots` sequences of up to `max_len` tokens, on the model's device and dtype."""
        p = next(self.hf.parameters())
        return HybridCache(self._specs, slots, max_len, dtype or p.dtype, device or p.device)


class _RecordSplitOps(TorchDispatchMode):
    """Records (kind, layer_id) of every split-op call under it."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = split_op_of(func)
        if op is not None:
            names = [a.name for a in func._schema.arguments]
            i = names.index("layer_id") if "layer_id" in names else len(args)
            self.calls.append((op.kind, kwargs.get("layer_id", args[i] if i < len(args) else None)))
        return func(*args, **kwargs)


def probe(lm: HybridLM) -> None:
    """Run 2 tokens and check that every layer of the table calls exactly one split op, of its kind.

    check_route catches a layer calling the wrong op; this also catches a layer that calls none (a mixer the
    adapter did not reach would run the model's own code, silently without our cache). The run is on fake tensors
    (shapes only: no kernel compiles or runs, which on a GPU would compile and autotune the split ops' prefill
    kernels at adapt time); a model whose code a fake run cannot take (data-dependent shapes, an op without a fake
    kernel) runs the 2 tokens for real instead.
    """
    try:
        calls = _probe_calls(lm, fake=True)
    except WroteInPlace:
        raise  # the real run would write it again
    except Exception:  # noqa: BLE001  (whatever the fake run could not do, the real run decides)
        calls = _probe_calls(lm, fake=False)
    called = {}
    for kind, layer_id in calls:
        called.setdefault(layer_id, []).append(kind)
    layers = sorted(set(called) | set(lm.layer_kinds), key=str)
    wrong = {i: called.get(i) for i in layers if called.get(i) != [lm.layer_kinds.get(i)]}
    if wrong:
        detail = ", ".join(f"layer {i}: config {lm.layer_kinds.get(i)!r}, called {k or 'no split op'}"
                           for i, k in wrong.items())
        raise ValueError(f"{lm.family}: the model's layers disagree with its config's layer kinds ({detail})")


@contextlib.contextmanager
def _quiet_fake_tensors(quiet: bool):
    """The fake run's failures are expected (the real run follows): keep torch's fake-tensor logger from printing
    their tracebacks (an fp32 MoE's grouped_mm, for one, has no fake kernel)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    if quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _probe_calls(lm: HybridLM, fake: bool) -> list[tuple[str, int | None]]:
    """(kind, layer_id) of every split-op call of a 2-token forward, on fake tensors or for real."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = next(lm.hf.parameters()).device
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    # outside inference mode, so that writing an inference tensor (a model built under it) raises, as any other
    # in-place write of a parameter or buffer does after the run (`_state_kept`)
    with torch.inference_mode(False), torch.no_grad(), _state_kept(lm) as inference, mode, \
            _quiet_fake_tensors(fake), _RecordSplitOps() as rec, forward_context(ForwardContext(seq_lens=[2])):
        ids, positions = torch.zeros(2, dtype=torch.long, device=device), torch.arange(2, device=device)
        try:
            lm(ids, positions)
        except Exception as e:
            if inference and isinstance(e, RuntimeError) and "Inplace update to inference tensor" in str(e):
                raise _wrote_in_place(f"one of its inference tensors ({e})") from e
            if fake:
                raise
            raise ValueError(
                f"{lm.family}: a probe forward of 2 tokens failed ({type(e).__name__}: {e}): the transformers "
                f"model cannot run this config (its own error above), or the config's layer types disagree with "
                f"the model's modules"
            ) from e
    return rec.calls


class WroteInPlace(ValueError):
    """The model's forward wrote one of its parameters or buffers in place (adapt's probe found it)."""


def _wrote_in_place(what: str) -> WroteInPlace:
    return WroteInPlace(
        f"the model's forward wrote {what} in place or replaced its data (during adapt's 2-token probe, which may "
        f"have changed its values: reload the model). hattn cannot serve a forward that keeps state in its "
        f"parameters, buffers or tensor attributes: every step of a packed batch would change what the next one "
        f"reads, across sequences. Keep such state outside the module, or run it with transformers")


@contextlib.contextmanager
def _state_kept(model: nn.Module):
    """Put back every module's attributes as they were, and the contents of its dicts and sets (parameters, buffers,
    submodules, hooks) in place: a forward may leave state on its modules (transformers' longrope RoPE kept a fake
    `long_inv_freq` from the probe; its output capture installs hooks and sets a flag), which would be the probe's,
    a fake tensor or a 2-token one, in every later forward. A tensor of the model (parameter, buffer or attribute)
    the forward wrote in place or moved (`.data = ...`) cannot be put back (the fake mode lets an in-place op on a
    real tensor write it): that is an error naming it. Not seen: an in-place write through `.data` (a version counter
    of its own)."""
    saved = [(m, dict(m.__dict__), [(c, copy.copy(c)) for c in m.__dict__.values() if isinstance(c, (dict, set))])
             for m in model.modules()]
    owner = getattr(model, "hf", model)  # names as in the transformers model
    before = _tensor_states(owner)
    try:
        yield any(state[0] is None for state in before.values())  # whether it holds inference tensors
    finally:
        for m, attrs, containers in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for now, then in containers:
                now.clear()
                now.update(then)
        written = [name for name, state in _tensor_states(owner).items() if before.get(name, state) != state]
        if written:  # also where the forward failed after the write (its error is this one's __context__)
            raise _wrote_in_place(f"{', '.join(written[:3])}{' and more' if len(written) > 3 else ''}")


def _tensor_states(model: nn.Module) -> dict[str, tuple]:
    """Each parameter, buffer and tensor attribute of the model's modules by name: its version counter (bumped by
    every in-place write; None for an inference tensor, which has none), device, dtype, and for a dense tensor its
    shape, strides and address."""
    tensors = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    for prefix, m in model.named_modules():
        tensors.update((f"{prefix}.{k}" if prefix else k, v) for k, v in m.__dict__.items()
                       if isinstance(v, torch.Tensor))
    return {name: _state(t) for name, t in tensors.items()}


def _state(t: torch.Tensor) -> tuple:
    from torch._subclasses.fake_tensor import is_fake

    try:
        version = t._version
    except RuntimeError:  # an inference tensor, or one made from it outside inference mode
        version = None
    if t.layout != torch.strided or t.is_nested:
        return version, t.device, t.dtype
    return version, t.device, t.dtype, t.shape, t.stride(), None if is_fake(t) or t.is_meta else t.data_ptr()


def _check_rope(model: nn.Module) -> None:
    """Refuse RoPE whose frequencies a forward picks from the step's largest position: "dynamic" NTK scaling and
    "longrope" (long or short frequencies for all tokens). hattn packs sequences into one step and prefills a long
    prompt in steps, so one sequence's length would set another's frequencies, or a prompt's first step would take
    other ones than transformers' single forward."""
    for name, module in model.named_modules():
        types = getattr(module, "rope_type", None)
        types = types.values() if isinstance(types, dict) else [types]
        found = sorted({t for t in types if isinstance(t, str) and ("dynamic" in t or t == "longrope")})
        if found:
            raise ValueError(
                f"{name or type(module).__name__}: rope_type {found[0]!r} picks the rotary frequencies at every "
                f"forward from the step's largest position; hattn packs sequences into one step and prefills long "
                f"prompts in steps, so one sequence would set another's frequencies. Serve a static RoPE scaling "
                f"instead (set rope_parameters' rope_type to 'linear', 'yarn' or 'default'), or run this model with "
                f"transformers")


def adapt(hf_model: nn.Module, check: bool = True) -> HybridLM:
    """Make `hf_model` (an unmodified transformers causal LM of a supported family) call hattn's split ops.

    Modifies `hf_model` in place (attention implementation, mixer classes, `share_activations`, `guard_hf_calls`)
    and returns the HybridLM
    around it; adapting it again gives a new HybridLM around the same model.
    `check` runs a 2-token probe (see `probe`); it is skipped for models on the meta device.
    """
    config = text_config(hf_model.config)
    family = family_of(config)
    family.check(config)
    kinds = family.layer_kinds(config)
    _check_rope(hf_model)
    _patch_layers(hf_model, family, kinds)
    share_activations(hf_model, _patched_class)
    _set_attention(hf_model)
    guard_hf_calls(hf_model)
    lm = HybridLM(hf_model.eval(), family, kinds)
    if check and next(hf_model.parameters()).device.type != "meta":
        start = time.perf_counter()
        probe(lm)
        register(Stats(probe_seconds=time.perf_counter() - start))
    return lm

"""The front door: an unmodified transformers causal LM, adapted and compiled in one line.

    model = hattn.compile(hf_model)                                     # mode="bcg"; any option of hattn.backend
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)   # [B, T + new], as transformers'

`compile` adapts the model (`hattn.adapt`: its attention and mixers call hattn's split ops) and compiles the adapted
module with the hattn backend. The returned `CompiledLM` takes transformers' common generate arguments
(`hattn.models.hf_generate`) and is also a packed model for `hattn.generate(model, prompts)` and own loops.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from hattn.compiler.artifacts import keep_kernels_in
from hattn.compiler.backend import HattnBackend, backend
from hattn.compiler.dispatch import dispatch_for
from hattn.models.cache import HybridCache
from hattn.models.generate import generate as packed_generate
from hattn.models.hf import HybridLM, adapt
from hattn.models.hf_generate import merged_config, output, repad, request, stream_to
from hattn.runtime.tokens import plain_layout


class CompiledLM:
    """A transformers causal LM adapted by hattn and compiled with its backend (what `hattn.compile` returns).

    generate(input_ids [B, T], attention_mask=None, ...) -> [B, T + new]: transformers' generate for the common
    arguments. Called as `model(input_ids [T], positions [T], logits_rows [R] = None) -> logits` it is the compiled
    packed HybridLM (sequences packed along T, under a `hattn.ForwardContext`), so `hattn.generate(model, prompts)`
    serves it.
    """

    def __init__(self, lm: HybridLM, hattn_backend: HattnBackend):
        self.lm, self.backend = lm, hattn_backend
        self.model = torch.compile(lm, backend=hattn_backend)
        self._call = dispatch_for(self.model)  # Dynamo once per kind of step, then the compiled graph directly
        self._cache: HybridCache | None = None
        self._bound = self.device, self.dtype  # what its graphs, fused weights and cache are for
        self._lock, self._generating = threading.Lock(), None  # one generate at a time: they share the cache

    # -- what transformers users touch ---------------------------------------------------------------------------
    @property
    def hf(self) -> nn.Module:
        """The adapted transformers model (its own generate refuses: it would give wrong tokens)."""
        return self.lm.hf

    @property
    def config(self):
        return self.hf.config

    @property
    def generation_config(self):
        return self.hf.generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.hf.generation_config = value

    def __getattr__(self, name: str):
        """The transformers model's other attributes (eval, parameters, get_input_embeddings, name_or_path, ...), as
        torch.compile's wrapper shows its module's."""
        if name.startswith("__") or "lm" not in self.__dict__ or name in ("backend", "model", "_call", "_cache",
                                                                          "_bound", "_lock", "_generating"):
            raise AttributeError(name)  # not set yet (a copy being built) or a dunder Python asks for
        return getattr(self.hf, name)

    def eval(self) -> "CompiledLM":
        """The model in eval mode; returns this model, as torch.compile's wrapper returns itself."""
        return self.train(False)

    def train(self, mode: bool = True) -> "CompiledLM":
        """The adapted wrapper and the transformers model in it (the dispatcher reads the wrapper's mode: the
        transformers model's alone left the eval-mode graphs serving a model in training mode)."""
        self.lm.train(mode)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "CompiledLM":
        self.hf.requires_grad_(requires_grad)
        return self

    def to(self, *args, **kwargs) -> "CompiledLM":
        """Itself where the device and dtype asked for are the model's; otherwise an error: the compiled graphs,
        fused weights and cache are bound to one device and dtype (move or cast the model before hattn.compile)."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        bound_device, bound_dtype = self._bound
        same_device = device is None or (device.type == bound_device.type and (
            device.type == "cpu" or device.index in (None, bound_device.index)))  # the CPU is one device: cpu:0 too
        if same_device and (dtype is None or dtype == bound_dtype):
            self._check_unmoved()
            return self
        raise ValueError(f"CompiledLM.to({', '.join(map(repr, args))}): {self._bound_to()}")

    def _bound_to(self) -> str:
        device, dtype = self._bound
        return (f"this model was compiled on {device} in {dtype}, and its graphs, fused weights and cache are bound "
                f"to them. Move or cast the transformers model first, then compile: hattn.compile(model.to(...))")

    def _check_unmoved(self) -> None:
        """The transformers model cast or moved behind this wrapper's back (`hf.half()`): a clear error, not a
        dtype mismatch deep in a compiled piece."""
        if (self.device, self.dtype) != self._bound:
            raise ValueError(f"the transformers model is now on {self.device} in {self.dtype}, but {self._bound_to()}")

    def __deepcopy__(self, memo):
        raise TypeError("a CompiledLM cannot be copied: its graphs hold the original's weights (fused into one "
                        "buffer) and cache. Copy the transformers model, then compile the copy: "
                        "hattn.compile(copy.deepcopy(model.hf))")

    def cuda(self, device=None) -> "CompiledLM":
        return self.to("cuda" if device is None else torch.device("cuda", device) if isinstance(device, int)
                       else device)

    def cpu(self) -> "CompiledLM":
        return self.to("cpu")

    def half(self) -> "CompiledLM":
        return self.to(torch.float16)

    def float(self) -> "CompiledLM":
        return self.to(torch.float32)

    def bfloat16(self) -> "CompiledLM":
        return self.to(torch.bfloat16)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def hattn_config(self):
        """The backend's Config (generate reads its capture sizes: prompts longer than the largest go in steps)."""
        return self.backend.config

    @property
    def stats(self):
        """What the backend compiled and ran (graphs, pieces, split ops, CUDA graphs, replays, ...)."""
        return self.backend.stats

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, *,
                 input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        """transformers' generate for a left- or right-padded batch: input_ids, attention_mask [B, T] ->
        [B, T + new], each row its input then its new tokens then the pad token.

        kwargs: max_new_tokens, max_length, min_new_tokens, min_length, do_sample, temperature, top_k, top_p, min_p,
        repetition_penalty, no_repeat_ngram_size, num_return_sequences (rows [B * n, ...], each input's n in a row),
        eos_token_id, pad_token_id, streamer (transformers' streamers: each step's tokens, then end()),
        return_dict_in_generate with output_scores / output_logits (transformers' output object), seed (hattn's:
        reproducible sampling); use_cache, cache_implementation, cache_config, compile_config and disable_compile
        are ignored (hattn's own cache). Unset ones come from `generation_config` (default: the model's), then
        transformers' defaults. Greedy tokens equal transformers' generate; sampling draws from its processors'
        distribution. The arguments are transformers': the prompt first (`inputs`, or `input_ids=`), then
        `generation_config`; the rest by keyword.
        """
        if input_ids is None:
            input_ids = inputs
        elif inputs is not None:
            raise ValueError("pass the prompt once: input_ids or inputs (transformers' name for it), not both")
        if isinstance(generation_config, torch.Tensor):
            raise TypeError("generate's second positional argument is generation_config, as in transformers, got a "
                            "tensor: pass the mask by keyword, generate(input_ids, attention_mask=mask, ...)")
        if input_ids is None:
            raise ValueError("generate needs the prompt ids: model.generate(input_ids [B, T], attention_mask=...) "
                             "(hattn does not start from the BOS token alone; pass [[bos_token_id]] for that)")
        self._check_unmoved()
        if self._generating == threading.get_ident():
            raise RuntimeError("generate was called again from inside a generate of the same model (a streamer's "
                               "put?): they share one cache; call it after the first returns")
        with self._lock:  # another thread's call waits: both would take slots of the one cache
            self._generating = threading.get_ident()
            try:
                return self._generate(input_ids, attention_mask, generation_config, **kwargs)
            finally:
                self._generating = None

    def _generate(self, input_ids, attention_mask, generation_config, **kwargs):
        req = request(input_ids, attention_mask, merged_config(generation_config, self.generation_config),
                      max_positions=getattr(self.hf.config, "max_position_embeddings", None), **kwargs)
        need = max(len(p) for p in req.prompts) + req.params.max_new_tokens
        on_tokens = stream_to(req)
        try:
            res = packed_generate(self, req.prompts, self._cache_for(len(req.prompts), need), req.params,
                                  on_tokens=on_tokens, keep=req.keep)
        finally:  # a streamer's consumer (TextIteratorStreamer) waits for end(), also after an error
            if req.streamer is not None:
                req.streamer.end()
        return output(req, repad(req.rows, res.tokens, req.pad_token_id), res)

    # -- the packed model ----------------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                 logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None or getattr(input_ids, "dim", lambda: 1)() != 1:
            raise TypeError("a CompiledLM called directly is the packed model: model(input_ids [T], positions [T]) "
                            "under a hattn.ForwardContext (hattn.generate drives it). For transformers' logits of "
                            "one sequence call model.hf(input_ids [1, T]); to generate, model.generate(input_ids)")
        # a view (a slice at an offset) would give Dynamo a second dynamic size: the graph would run graph-free
        return self._call(plain_layout(input_ids), plain_layout(positions), logits_rows)

    @property
    def layer_kinds(self) -> dict[int, str]:
        return self.lm.layer_kinds

    def cache_specs(self):
        return self.lm.cache_specs()

    def make_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> HybridCache:
        return self.lm.make_cache(slots, max_len, dtype, device)

    def _cache_for(self, slots: int, max_len: int) -> HybridCache:
        """One cache kept across calls (graph modes capture over its addresses): the first call's size, grown when
        a call needs more to at least twice the old slots (length), so that calls of growing batches make few caches
        (each slot count is a Dynamo graph of its own: grown to each batch's exact size, batches of 1..11 rows made
        11 and hit Dynamo's recompile limit, after which calls ran uncompiled). The exact size where the doubled one
        would not fit the device."""
        cache = self._cache
        if cache is None or cache.slots < slots or cache.max_len < max_len:
            exact = (max(slots, cache.slots), max(max_len, cache.max_len)) if cache is not None else (slots, max_len)
            grown = exact if cache is None else tuple(n if n == old else max(n, 2 * old) for n, old in
                                                      zip(exact, (cache.slots, cache.max_len)))
            self._cache = None  # free the old one before allocating the new
            try:
                self._cache = self.make_cache(*grown)
            except ValueError:  # more than the device has (HybridCache checks before allocating)
                self._cache = self.make_cache(*exact)
        return self._cache

    def __repr__(self) -> str:
        return (f"CompiledLM({type(self.hf).__name__}, family={self.lm.family}, mode={self.backend.config.mode}, "
                f"inner_compiler={self.backend.config.inner_compiler}, device={self.device}, dtype={self.dtype})")


def compile(model, mode: str = "bcg", **options) -> CompiledLM:  # noqa: A001  (hattn.compile, as torch.compile)
    """Adapt an unmodified transformers causal LM of a supported family and compile it with the hattn backend.

    model: a transformers causal LM (AutoModelForCausalLM; any device and dtype), the HybridLM `hattn.adapt`
    returned, or a CompiledLM (compiled again with the new mode and options). The model is adapted in place.
    mode, options: as `hattn.backend` (mode eager | pcg | bcg | full; inner_compiler, capture_sizes, progress).
    """
    hattn_backend = backend(mode, **options)  # bad options fail before the model is touched
    if hattn_backend.config.cache_dir is not None:  # before adapt's probe, which may compile kernels
        keep_kernels_in(hattn_backend.config.cache_dir)
    return CompiledLM(_adapted(model), hattn_backend)


def _adapted(model) -> HybridLM:
    if isinstance(model, CompiledLM):
        return model.lm
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(model, HybridLM):
        return model
    if not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        raise TypeError(f"hattn.compile takes a transformers causal LM (AutoModelForCausalLM.from_pretrained(...)), "
                        f"got {type(model).__name__}; for your own nn.Module use torch.compile(module, "
                        f"backend='hattn')")
    if model.get_output_embeddings() is None:
        raise TypeError(f"hattn.compile needs a causal LM with its LM head, got {type(model).__name__}: load it with "
                        f"AutoModelForCausalLM, not AutoModel")
    return adapt(model)

"""Every adapted family == its unmodified transformers model: logits of a packed prefill, 32 greedy tokens."""
import re

import pytest
import torch

from hattn.models.generate import SamplingParams, generate, run_step
from hattn.passes.split import split_graph
from hattn.runtime import graph_layout
from hattn.context import ForwardContext, forward_context

NEW_TOKENS = 32  # as conftest's reference


def test_greedy_tokens_equal_hf_generate(family_case):
    c = family_case
    res = generate(c.lm, c.prompts, params=SamplingParams(max_new_tokens=NEW_TOKENS))
    assert res.tokens == c.ref.tokens
    assert res.decode_steps == NEW_TOKENS - 1


def test_packed_prefill_logits_close_to_hf(family_case):
    c = family_case
    ids = torch.tensor([t for p in c.prompts for t in p])
    pos = torch.cat([torch.arange(len(p)) for p in c.prompts])
    with torch.no_grad(), forward_context(ForwardContext(seq_lens=[len(p) for p in c.prompts])):
        logits = c.lm(ids, pos)
    start = 0
    for p in c.prompts:
        with torch.no_grad():
            want = c.hf(input_ids=torch.tensor([p])).logits[0]
        torch.testing.assert_close(logits[start:start + len(p)], want, atol=1e-4, rtol=1e-4)
        start += len(p)


def test_every_layer_calls_a_split_op_of_its_kind(family_case):
    kinds = set(family_case.lm.layer_kinds.values())
    assert "full" in kinds and len(kinds) == 2  # a hybrid: full attention + one mixer kind


def test_adapter_keeps_parameters(make_case):
    c = make_case("tiny")
    got = dict(c.lm.hf.named_parameters())
    for name, p in c.hf.named_parameters():
        assert torch.equal(got[name], p), name


def test_padding_rows_leave_real_rows_unchanged(family_case):
    """Graph runtimes pad the token dim with zeros up to a capture size; real rows must not see the padding."""
    c = family_case
    lens = [len(p) for p in c.prompts]
    ids = torch.tensor([t for p in c.prompts for t in p])
    pos = torch.cat([torch.arange(n) for n in lens])
    pad = 9
    outs = []
    for extra in (0, pad):
        cache = c.lm.make_cache(slots=3, max_len=40)
        ctx = ForwardContext(seq_lens=lens, cache=cache, layer_kinds=c.lm.layer_kinds)
        with torch.no_grad(), forward_context(ctx):
            prefill = c.lm(torch.cat([ids, ids.new_zeros(extra)]), torch.cat([pos, pos.new_zeros(extra)]))
        step = ForwardContext(seq_lens=[1, 1, 1], context_lens=lens, cache=cache, layer_kinds=c.lm.layer_kinds)
        with torch.no_grad(), forward_context(step):
            decode = c.lm(torch.tensor([1, 2, 3] + [0] * extra), torch.tensor(lens + [0] * extra))
        outs.append((prefill[:len(ids)], decode[:3]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_the_token_count_is_the_one_dynamic_size_of_the_graph(family_case):
    """Graph modes need one dynamic size. A family without rotary embeddings (Kimi-Linear, Nemotron-H) never relates
    positions to input_ids, so Dynamo gave each its own symbol and pcg/bcg fell back to graph-free (seen on the H100);
    the adapter's shape check ties them."""
    c = family_case
    layouts = []

    def record(gm, example_inputs):
        layouts.append(graph_layout(split_graph(gm)[0]))
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(c.lm, backend=record)
    ids = torch.tensor([t for p in c.prompts for t in p])
    pos = torch.cat([torch.arange(len(p)) for p in c.prompts])
    ctx = ForwardContext(seq_lens=[len(p) for p in c.prompts], layer_kinds=c.lm.layer_kinds)
    run_step(compiled, ctx, ids, pos)
    assert layouts and all(layout.reason is None for layout in layouts), [layout.reason for layout in layouts]


def _tiny_with_rope(**rope):
    from hattn.models.presets import preset_config

    config = preset_config("tiny").to_dict()
    config.update(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25, **rope},
                  max_position_embeddings=128)
    return type(preset_config("tiny")).from_dict(config)


def test_the_adapt_probe_leaves_no_state_on_the_model(monkeypatch):
    """A forward that keeps state on its modules kept the probe's: transformers' longrope RoPE kept a fake
    `long_inv_freq` (logits off by 0.4 past original_max_position_embeddings), and its output capture's hooks were
    kept while its flag was not (each forward then added them again: 9 hidden states instead of 5)."""
    import copy

    from hattn.models.hf import adapt
    from hattn.models.presets import preset_config, random_model

    config = preset_config("tiny")
    config.output_hidden_states = True
    hf = random_model(config)
    ref = copy.deepcopy(hf)
    rotary = type(hf.model.rotary_emb)
    forward = rotary.forward

    def remembering(self, x, position_ids):  # a forward caching what it saw first, as longrope's does
        if getattr(self, "first", None) is None:
            self.first = position_ids.clone()
        return forward(self, x, position_ids)

    monkeypatch.setattr(rotary, "forward", remembering)
    adapt(hf)
    assert getattr(hf.model.rotary_emb, "first", None) is None
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = hf(input_ids=ids, use_cache=False), ref(input_ids=ids, use_cache=False)
    torch.testing.assert_close(got.logits, want.logits)
    assert len(got.hidden_states) == len(want.hidden_states) == config.num_hidden_layers + 1
    assert hf.model.rotary_emb.first.shape[-1] == 9  # the real forward's


_WRITES = {  # how a forward may keep state in a tensor of its module: (write, the name the error gives)
    "buffer": (lambda m: m.steps.add_(1), "model.rotary_emb.steps"),
    "attribute": (lambda m: m.plain.add_(1), "model.rotary_emb.plain"),  # a tensor attribute, not a buffer
    "data": (lambda m: setattr(m.steps, "data", m.steps + 1), "model.rotary_emb.steps"),  # fake: a meta tensor
    "then_fail": (lambda m: (m.steps.add_(1), _fail(m.steps)), "model.rotary_emb.steps"),  # no real run after it
}


def _fail(t):
    raise RuntimeError("a forward that fails after its write")


@pytest.mark.parametrize("fake", [True, False])
@pytest.mark.parametrize("write", sorted(_WRITES))
def test_a_forward_that_writes_a_buffer_in_place_is_an_error_at_adapt(monkeypatch, fake, write):
    """The probe puts back module attributes, not tensor contents: a forward writing a tensor of its module in place
    (here a step counter, on the probe's fake tensors or, where those fail, real ones) changed it silently; under
    the fake mode `.data = ...` left a meta tensor in the real model."""
    from hattn.models import hf as hf_module
    from hattn.models.presets import preset_config, random_model

    hf = random_model(preset_config("tiny"))
    rotary = hf.model.rotary_emb
    rotary.register_buffer("steps", torch.zeros(()), persistent=False)
    rotary.plain = torch.zeros(())
    forward, (step, name) = type(rotary).forward, _WRITES[write]

    def counting(self, x, position_ids):
        step(self)
        return forward(self, x, position_ids)

    monkeypatch.setattr(type(rotary), "forward", counting)
    if not fake:
        probe_calls = hf_module._probe_calls
        monkeypatch.setattr(hf_module, "_probe_calls", lambda lm, fake: probe_calls(lm, False))
    with pytest.raises(hf_module.WroteInPlace, match=f"forward wrote {re.escape(name)} in place"):
        hf_module.adapt(hf)
    if write in ("buffer", "then_fail"):
        assert rotary.steps.item() == 1  # written once: the fake run's error is not followed by a real run


def test_a_forward_that_writes_an_inference_tensor_is_an_error_at_adapt(monkeypatch):
    """A model built under inference_mode has no version counters; its probe runs outside inference mode, where
    such a write raises."""
    from hattn.models import hf as hf_module
    from hattn.models.presets import preset_config, random_model

    with torch.inference_mode():
        hf = random_model(preset_config("tiny"))
        hf.model.rotary_emb.register_buffer("steps", torch.zeros(()), persistent=False)
    forward = type(hf.model.rotary_emb).forward

    def counting(self, x, position_ids):
        self.steps.add_(1)
        return forward(self, x, position_ids)

    monkeypatch.setattr(type(hf.model.rotary_emb), "forward", counting)
    with torch.inference_mode(), pytest.raises(hf_module.WroteInPlace, match="one of its inference tensors"):
        hf_module.adapt(hf)


def test_adapt_under_inference_mode_lets_a_forward_write_its_own_inputs(monkeypatch):
    """The probe's token ids are made outside inference mode, as the forward runs: a forward clamping its input ids
    in place is no write of the model's (a review found it reported as one, on the real probe's path)."""
    from hattn.models.hf import adapt
    from hattn.models.presets import preset_config, random_model

    hf = random_model(preset_config("tiny-qwen3-next"))  # fp32 MoE: its probe runs for real
    embed = type(hf.model.embed_tokens)
    forward = embed.forward

    def clamping(self, ids):
        ids.clamp_(max=self.num_embeddings - 1)
        return forward(self, ids)

    monkeypatch.setattr(embed, "forward", clamping)
    with torch.inference_mode():
        assert adapt(hf).layer_kinds


def test_adapt_under_inference_mode_serves_a_model_built_under_it():
    from hattn.models.hf import adapt
    from hattn.models.presets import preset_config, random_model

    with torch.inference_mode():
        hf = random_model(preset_config("tiny"))
        lm = adapt(hf)
    assert lm.layer_kinds


@pytest.mark.parametrize("rope", [dict(rope_type="dynamic", factor=2.0),
                                  dict(rope_type="longrope", factor=2.0, short_factor=[1.0, 1.0],
                                       long_factor=[4.0, 4.0], original_max_position_embeddings=64)])
def test_rope_that_picks_frequencies_from_the_steps_longest_position_is_refused(rope):
    """Packed with a longer sequence, or in a long prompt's first prefill step, a sequence got other frequencies than
    transformers gives it alone (longrope: logits off by 0.4)."""
    from hattn.models.hf import adapt
    from hattn.models.presets import random_model

    with pytest.raises(ValueError, match=f"rope_type '{rope['rope_type']}' picks the rotary frequencies"):
        adapt(random_model(_tiny_with_rope(**rope)))


def test_value_heads_that_are_no_multiple_of_the_key_heads_are_refused_at_adapt():
    """transformers' own forward fails on such a config; adapt's probe (fake tensors) passed it, and the first prefill
    failed in hattn's kernel."""
    from hattn.models.hf import adapt
    from hattn.models.presets import preset_config, random_model

    config = preset_config("tiny")
    config.linear_num_key_heads, config.linear_num_value_heads = 4, 6
    with pytest.raises(ValueError, match=r"linear_num_value_heads \(6\) must be a multiple of linear_num_key_heads"):
        adapt(random_model(config))

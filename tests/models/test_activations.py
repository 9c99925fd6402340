"""Activation modules made once per name (hattn.models.activations): what the adapter patches, and what Dynamo no
longer traces."""
import collections

import pytest
import torch
from transformers.activations import ACT2FN

import hattn
import hattn.models.hf as hf
from hattn.models.activations import SHARED, SharedActivations
from hattn.models.presets import preset_config, random_model


def test_stateless_activations_are_made_once_and_the_others_at_every_lookup():
    shared = SharedActivations(ACT2FN)
    assert shared["silu"] is shared["silu"]
    assert type(shared["silu"]) is type(ACT2FN["silu"])
    assert shared["prelu"] is not shared["prelu"]  # parameters: a new module at every lookup, as transformers does
    assert "silu" in shared and len(shared) == len(ACT2FN) and shared.get("nope") is None  # ACT2FN's dict interface


def _reads(module, name: str) -> bool:
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and name in code.co_names


def test_no_forward_of_an_adapted_model_builds_activations_at_every_call(family_case):
    assert not any(_reads(m, "ACT2FN") for m in family_case.lm.hf.modules())
    shared = [m for m in family_case.lm.hf.modules() if _reads(m, SHARED)]
    # the unmodified model's modules that look ACT2FN up in their forward are those the adapter shared
    assert len(shared) == sum(_reads(m, "ACT2FN") for m in family_case.hf.modules()), family_case.preset
    for m in shared:
        assert isinstance(type(m).forward.__globals__[SHARED], SharedActivations)
        assert type(m).forward.__globals__["ACT2FN"] is ACT2FN  # transformers' own name is left as it was


def test_an_eager_run_between_compiled_steps_does_not_recompile(one_thread):
    lm = hf.adapt(random_model(preset_config("tiny"), seed=0), check=False)  # no probe: nothing looked up yet
    graphs = []
    compiled = torch.compile(lm, backend=lambda gm, _: graphs.append(gm) or gm.forward)
    cache = lm.make_cache(slots=1, max_len=16)
    torch._dynamo.reset()
    try:
        for model in (compiled, lm, compiled):
            ctx = hattn.ForwardContext(seq_lens=[4], slots=[0], cache=cache, layer_kinds=lm.layer_kinds)
            with hattn.forward_context(ctx), torch.inference_mode():
                model(torch.arange(4), torch.arange(4))
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1


def _traced_frames(lm) -> collections.Counter:
    """How many bytecode instructions Dynamo stepped through per (file, function) while tracing one packed step."""
    from torch._dynamo.symbolic_convert import InstructionTranslatorBase

    steps = collections.Counter()
    step = InstructionTranslatorBase.step

    def counting(self):
        steps[(self.f_code.co_filename, self.f_code.co_name)] += 1
        return step(self)

    cache = lm.make_cache(slots=1, max_len=16)
    ctx = hattn.ForwardContext(seq_lens=[4], slots=cache.alloc(1), cache=cache, layer_kinds=lm.layer_kinds)
    torch._dynamo.reset()
    compiled = torch.compile(lm, backend=lambda gm, _: gm.forward)
    try:
        InstructionTranslatorBase.step = counting
        with hattn.forward_context(ctx), torch.inference_mode():
            compiled(torch.arange(4), torch.arange(4))
    finally:
        InstructionTranslatorBase.step = step
        torch._dynamo.reset()
    return steps


@pytest.mark.parametrize("share", [True, False], ids=["shared", "control"])
def test_dynamo_traces_no_activation_construction_in_an_adapted_forward(share, monkeypatch, one_thread):
    if not share:  # the control: transformers' ACT2FN builds a module in every gated norm's forward
        monkeypatch.setattr(hf, "share_activations", lambda *a: 0)
    lm = hf.adapt(random_model(preset_config("tiny"), seed=0))
    steps = _traced_frames(lm)
    instantiated = sum(n for (file, name), n in steps.items()
                       if name == "__getitem__" and file.endswith("transformers/activations.py"))
    assert (instantiated == 0) == share, instantiated

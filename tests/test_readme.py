"""README.md's python snippets, run in order in one namespace as a reader would run them (CPU, in CI).

Stand-ins keep it offline and fast without touching what the snippets show: `from_pretrained` gives the tiny
Qwen3.5-shaped preset (random weights) and a byte-level tokenizer (no hub download in CI), and the pieces between
split ops are compiled with inner_compiler="eager" (inductor's CPU builds would take minutes).
"""
import pathlib
import re

import pytest
import torch
from torch._dynamo.backends import registry as dynamo_backends
from transformers import AutoModelForCausalLM, AutoTokenizer, BatchEncoding

import hattn.frontdoor
from hattn.compiler.backend import backend, hattn_backend
from hattn.models.presets import preset_config, random_model

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


class ByteTokenizer:
    """Text <-> UTF-8 bytes as token ids (1..255 < the tiny preset's vocabulary); id 0 pads, on `padding_side`."""

    def __init__(self, padding_side: str = "right"):
        self.padding_side = padding_side

    def __call__(self, text, return_tensors=None, padding=False):
        if isinstance(text, str):
            return {"input_ids": list(text.encode())}
        rows = [list(t.encode()) for t in text]
        width = max(map(len, rows))
        pads = [[0] * (width - len(r)) for r in rows]
        side = (lambda pad, row: pad + row) if self.padding_side == "left" else (lambda pad, row: row + pad)
        ids = [side(pad, row) for pad, row in zip(pads, rows)]
        mask = [side([0] * len(pad), [1] * len(row)) for pad, row in zip(pads, rows)]
        return BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})

    def batch_decode(self, rows, skip_special_tokens=False):
        return [bytes(t for t in row if 0 < t < 256).decode(errors="replace") for row in rows.tolist()]


@pytest.fixture
def offline_and_fast(monkeypatch, one_thread):
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        staticmethod(lambda name, dtype=torch.float32: random_model(preset_config("tiny"), dtype)))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", staticmethod(lambda name, **kw: ByteTokenizer(**kw)))
    monkeypatch.setattr(hattn.frontdoor, "backend", lambda mode, **o: backend(mode, **{"inner_compiler": "eager", **o}))
    dynamo_backends.lookup_backend("hattn")  # registers the entry point, then swap in eager pieces
    monkeypatch.setitem(dynamo_backends._COMPILER_FNS, "hattn", lambda gm, example_inputs, mode=None, options=None:
                        hattn_backend(gm, example_inputs, mode, {"inner_compiler": "eager", **(options or {})}))


def test_readme_has_the_sections_in_order():
    text = README.read_text()
    heads = ["## An unmodified transformers model, in one line", "## Packed prompts", "## Your own loop",
             "## Your own mixer", "## Modes and options"]
    assert [text.index(h) for h in heads] == sorted(text.index(h) for h in heads)
    assert len(snippets()) == 4


def test_readme_snippets_run(offline_and_fast, capsys):
    namespace: dict = {"__name__": "readme"}
    for code in snippets():
        exec(compile(code, str(README), "exec"), namespace)
    model, out, batch = namespace["model"], namespace["out"], namespace["batch"]
    assert isinstance(model, hattn.CompiledLM) and out.shape == (2, batch["input_ids"].shape[1] + 32)
    assert len(namespace["res"].tokens) == 2 and namespace["logits"].shape == (5, model.config.vocab_size)
    assert "register_fake" in snippets()[3] and "capture_safe" in snippets()[3] and "direct=" in snippets()[3]
    assert hattn.registry.split_op_of(torch.ops.mylib.decay_scan).kind == "decay"
    assert capsys.readouterr().out.count("\n") == 2  # the two prints

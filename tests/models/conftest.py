"""Shared fixtures: each tiny family model, adapted, with the unmodified HF copy's greedy tokens as reference."""
import copy
from dataclasses import dataclass

import pytest
import torch

from hattn.models.hf import HybridLM, adapt
from hattn.models.presets import TINY_FAMILIES, preset_config, random_model
from hattn.models.reference import Reference, hf_greedy

FAMILY_PRESETS = list(TINY_FAMILIES)
PROMPT_LENS = (5, 17, 9)
NEW_TOKENS = 32


@dataclass
class Case:
    preset: str
    hf: torch.nn.Module       # the unmodified model (a copy)
    lm: HybridLM              # the adapted one
    prompts: list[list[int]]
    ref: Reference


def prompts_for(vocab: int, lens=PROMPT_LENS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


_CASES: dict[str, Case] = {}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def case(preset: str) -> Case:
    """Built once per test session (HF generate is the slow part)."""
    if preset not in _CASES:
        hf = random_model(preset_config(preset), seed=0)
        reference = copy.deepcopy(hf)
        lm = adapt(hf)
        prompts = prompts_for(lm.config.vocab_size)
        _CASES[preset] = Case(preset, reference, lm, prompts, hf_greedy(reference, prompts, NEW_TOKENS))
    return _CASES[preset]


@pytest.fixture
def make_case():
    """case(preset) -> Case, shared across the session."""
    return case


@pytest.fixture(params=FAMILY_PRESETS)
def family_case(request) -> Case:
    return case(request.param)

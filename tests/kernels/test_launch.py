"""The launchers' shared checks (CPU): a check runs once per argument metadata, and a failure is never remembered."""
from __future__ import annotations

import pytest
import torch

from hattn.kernels.launch import CheckedOnce


def _counting_check(calls):
    def check(x, n):
        calls.append((tuple(x.shape), x.stride(), x.dtype, n))
        if n < 0 or x.dtype != torch.float32:
            raise ValueError("bad argument")
    return check


def test_checked_once_skips_metadata_that_passed():
    calls = []
    once = CheckedOnce(_counting_check(calls))
    x = torch.zeros(2, 3)
    once(x, 1)
    once(torch.ones(2, 3), 1)  # other data, same metadata: not checked again
    assert len(calls) == 1
    once(x.t(), 1)  # other shape and strides
    once(x, 2)  # another value of a non-tensor argument
    once(torch.zeros(2, 3, device="meta"), 1)  # another device
    assert len(calls) == 4


def test_checked_once_never_remembers_a_failure():
    calls = []
    once = CheckedOnce(_counting_check(calls))
    x = torch.zeros(2, 3)
    for _ in range(2):
        with pytest.raises(ValueError, match="bad argument"):
            once(x, -1)
        with pytest.raises(ValueError, match="bad argument"):
            once(x.double(), 1)
    assert len(calls) == 4
    once(x, 1)
    with pytest.raises(ValueError):  # a good call in between changes nothing
        once(x.double(), 1)


def test_checked_once_is_bounded():
    calls = []
    once = CheckedOnce(_counting_check(calls), size=2)
    x = torch.zeros(4)
    for n in (1, 2, 3):
        once(x, n)
    assert len(once.passed) <= 2
    once(x, 1)  # forgotten when the set was cleared: checked again
    assert len(calls) == 4


def test_next_pow2_is_the_smallest_power_of_two_not_below_n():
    from hattn.kernels.launch import next_pow2

    for n in range(1, 5000):
        p = next_pow2(n)
        assert p >= n and p & (p - 1) == 0 and (p == 1 or p // 2 < n), n

"""The divergence guard's verdict, step by step on the device: `found_inf` is 0 until the first
non-finite step and 1 from then on (every later update is skipped), and `check` names that
first step, its loss and its gradient norm."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.tasks.divergence import Diverged, DivergenceGuard


def test_found_inf_turns_on_at_the_first_non_finite_step_and_stays_on():
    guard = DivergenceGuard()
    guard.start(10, torch.device("cpu"))
    steps = [(2.0, 1.0), (1.5, 0.5), (float("nan"), 3.0), (1.0, float("inf")), (1.0, 1.0)]
    flags = []
    for loss, norm in steps:
        # A non-finite loss poisons the norm (MoETask.configure_gradient_clipping): loss × 0 + norm.
        flags.append(float(guard.update(torch.tensor(loss), torch.tensor(loss * 0.0 + norm))))
    assert flags == [0.0, 0.0, 1.0, 1.0, 1.0]
    with pytest.raises(Diverged) as info:
        guard.check(torch.nn.Module())
    assert info.value.step == 12  # the run started at step 10: the third update
    assert info.value.what.startswith("loss nan, gradient norm nan; ")


def test_a_finite_run_passes_the_check_and_names_its_first_bad_step_only():
    guard = DivergenceGuard()
    guard.start(0, torch.device("cpu"))
    for _ in range(3):
        guard.update(torch.tensor(1.0), torch.tensor(2.0))
    guard.check(torch.nn.Module())  # nothing to report
    guard.update(torch.tensor(4.0), torch.tensor(math.inf))
    guard.update(torch.tensor(math.nan), torch.tensor(math.nan))
    with pytest.raises(Diverged, match=r"training diverged at step 3: loss 4, gradient norm inf"):
        guard.check(torch.nn.Module())

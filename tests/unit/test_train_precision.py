"""Training precision: `auto` follows the device (bf16 only on CPUs that multiply it natively)."""

from __future__ import annotations

import pytest
import torch

import finestyle.train.step as step
from finestyle.config import TrainConfig


def cfg(mp: str) -> TrainConfig:
    return TrainConfig(dataset="d", base="builtin:tiny-sd", out="o", mixed_precision=mp)


@pytest.mark.parametrize("units, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_on_a_cpu_is_bf16_only_with_bf16_units(monkeypatch, units, expected):
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: units)
    assert step.train_precision(cfg("auto"), torch.device("cpu")) == expected


def test_explicit_precisions_are_kept_whatever_the_cpu(monkeypatch):
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: False)
    cpu = torch.device("cpu")
    assert step.train_precision(cfg("bf16"), cpu) == torch.bfloat16  # emulated: train says so
    assert step.train_precision(cfg("no"), cpu) is None
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: True)
    assert step.train_precision(cfg("no"), cpu) is None

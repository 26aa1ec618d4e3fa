"""OpenVINO precision selection: auto follows the CPU's bf16 units and the export's recorded check."""

from __future__ import annotations

import pytest

from finestyle.core.errors import UserError
from finestyle.runtime.openvino import hardware_precision, resolve_precision

AMX = frozenset({"avx512f", "amx_bf16", "amx_tile"})
EPYC = frozenset({"avx512f", "avx512_bf16"})
AVX2 = frozenset({"avx2", "fma"})


def checked(prec: str, ok: bool) -> dict:
    return {"openvino": {"checks": {prec: {"pass": ok, "mean_abs_diff": 0.01}}}}


def test_auto_follows_the_cpu_flags():
    assert hardware_precision(AMX) == "bf16"
    assert hardware_precision(EPYC) == "bf16"
    assert hardware_precision(AVX2) == "fp32"


def test_auto_picks_bf16_only_with_the_units_and_a_passing_check(capsys, monkeypatch):
    import finestyle.runtime.openvino as ov_runtime

    # "said once" per process: start from a process that has said nothing (on a CPU without bf16
    # units an earlier OpenVINO run in this worker has said it already)
    monkeypatch.setattr(ov_runtime, "_said", set())
    assert resolve_precision("auto", checked("bf16", True), AMX) == "bf16"
    assert resolve_precision(None, checked("bf16", True), EPYC) == "bf16"
    # no bf16 units: fp32, said once
    assert resolve_precision("auto", checked("bf16", True), AVX2) == "fp32"
    assert resolve_precision("auto", checked("bf16", True), AVX2) == "fp32"
    assert capsys.readouterr().err.count("no bf16 units") == 1
    # units, but the export's check failed or was never run: fp32
    assert resolve_precision("auto", checked("bf16", False), AMX) == "fp32"
    assert resolve_precision("auto", {}, AMX) == "fp32"


def test_explicit_reduced_precision_needs_a_passing_check():
    assert resolve_precision("fp32", {}, AVX2) == "fp32"
    assert resolve_precision("bf16", checked("bf16", True), AMX) == "bf16"
    with pytest.raises(UserError, match="failed its OpenVINO bf16 image check"):
        resolve_precision("bf16", checked("bf16", False), AMX)
    with pytest.raises(UserError, match="has no recorded OpenVINO fp16 image check"):
        resolve_precision("fp16", checked("bf16", True), AMX)
    with pytest.raises(UserError, match="use auto, fp32, bf16, fp16 or int8"):
        resolve_precision("int4", {}, AMX)
    # int8: only with a passing guard; `auto` prefers it on a CPU with int8 dot products (below)
    with pytest.raises(UserError, match="has no int8 UNet"):
        resolve_precision("int8", checked("bf16", True), AMX)
    with pytest.raises(UserError, match="failed its int8 quality guard"):
        resolve_precision("int8", checked("int8", False), AVX2)
    assert resolve_precision("auto", checked("int8", False), AMX | {"amx_int8"}) == "fp32"
    assert resolve_precision("int8", checked("int8", True), AVX2) == "int8"  # forced: as asked


def test_auto_picks_int8_only_where_the_cpu_has_int8_dot_products(capsys, monkeypatch):
    import finestyle.runtime.openvino as ov_runtime

    monkeypatch.setattr(ov_runtime, "_said", set())
    both = {"openvino": {"checks": {"int8": {"pass": True}, "bf16": {"pass": True}}}}
    assert resolve_precision("auto", both, AMX | {"amx_int8"}) == "int8"
    assert resolve_precision("auto", both, AVX2 | {"avx_vnni"}) == "int8"
    assert resolve_precision("auto", both, EPYC | {"avx512_vnni"}) == "int8"
    # without them int8 is no faster than float (measured 0.79x of fp32 on an AVX2 EPYC): float, said once
    assert resolve_precision("auto", both, AVX2) == "fp32"
    assert resolve_precision("auto", both, EPYC) == "bf16"
    assert capsys.readouterr().err.count("no int8 dot-product units") == 1

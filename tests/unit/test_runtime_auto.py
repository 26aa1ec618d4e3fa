"""`--runtime auto`: which runtime each machine gets, with the CPU's flags and the packages injected."""

from __future__ import annotations

import pytest

from finestyle.runtime.auto import Machine, choose_runtime

CPU = ("CPUExecutionProvider",)
AMX = frozenset({"avx2", "avx512f", "amx_bf16", "amx_int8", "avx512_vnni"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AVX2 = frozenset({"avx2", "fma"})


def manifest(bf16: bool | None = True, int8: bool | None = None) -> dict:
    checks = {}
    if bf16 is not None:
        checks["bf16"] = {"pass": bf16, "mean_abs_diff": 3.2e-3 if bf16 else 4.1e-2}
    if int8 is not None:
        checks["int8"] = {"pass": int8, "mean_abs_diff": 2.6e-2}
    return {"openvino": {"checks": checks}}


def machine(flags=AMX, openvino=True, providers=CPU, cuda=False) -> Machine:
    return Machine(
        flags=flags, openvino=openvino, ort_providers=providers, cuda=cuda, gpu_name="H100" if cuda else ""
    )


@pytest.mark.parametrize(
    ("m", "man", "runtime", "dtype", "why"),
    [
        (machine(AMX), manifest(), "openvino", "bf16", "AMX bf16, export check 3.2e-03"),
        (machine(AVX512_BF16), manifest(), "openvino", "bf16", "AVX-512 BF16 bf16"),
        (machine(AVX2), manifest(), "onnxruntime", None, "CPU without bf16 units"),
        (machine(AMX, openvino=False), manifest(), "onnxruntime", None, "OpenVINO not installed"),
        (machine(AMX), manifest(bf16=False), "onnxruntime", None, "bf16 check failed (4.1e-02)"),
        (machine(AMX), manifest(bf16=None), "onnxruntime", None, "no OpenVINO bf16 check"),
        (machine(AMX), manifest(int8=True), "openvino", "int8", "AMX int8"),
        (machine(AMX), manifest(int8=False), "openvino", "bf16", "AMX bf16"),
        (machine(AVX512_BF16), manifest(int8=True), "openvino", "bf16", "AVX-512 BF16 bf16"),
    ],
    ids=[
        "amx",
        "avx512-bf16",
        "avx2-only",
        "no-openvino",
        "failed-check",
        "no-check",
        "int8",
        "int8-failed",
        "int8-no-vnni",
    ],
)
def test_cpu_choice(m, man, runtime, dtype, why):
    c = choose_runtime(man, m)
    assert (c.runtime, c.dtype) == (runtime, dtype)
    assert why in c.reason
    if runtime == "onnxruntime":
        assert "fp32 onnxruntime" in c.reason and c.providers is None


def test_gpu_choice_uses_gpu_providers():
    m = machine(AMX, providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", *CPU), cuda=True)
    c = choose_runtime(manifest(), m)
    assert c.runtime == "onnxruntime"
    assert c.providers == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "not yet run on a GPU" in c.reason
    # onnxruntime-gpu lists CUDA even where there is no GPU: without one, the CPU rules apply
    no_gpu = machine(AMX, providers=("CUDAExecutionProvider", *CPU), cuda=False)
    assert choose_runtime(manifest(), no_gpu).runtime == "openvino"


def test_label_names_choice_and_reason():
    c = choose_runtime(manifest(), machine(AMX))
    assert c.label("openvino[CPU,bf16]") == "openvino[CPU,bf16] (auto: AMX bf16, export check 3.2e-03)"

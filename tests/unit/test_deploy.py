"""The GPU worker image, prefect.yaml, the Kubernetes job template and pyproject.toml agree."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.conftest import REPO, docs_text


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _gpu_deployment() -> dict:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return next(d for d in spec["deployments"] if d["name"] == "finestyle-pipeline-gpu")


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_image_tag_is_the_package_version_everywhere():
    tag = f"finestyle:{_pyproject()['project']['version']}-gpu"
    assert _gpu_deployment()["work_pool"]["job_variables"]["image"] == tag
    assert f"docker build -t {tag} ." in _dockerfile()
    assert f"docker build -t {tag} ." in docs_text()
    tpl = json.loads((REPO / "deploy" / "k8s-gpu-job-template.json").read_text())
    assert tpl["variables"]["properties"]["image"]["default"] == tag


def test_dockerfile_installs_the_gpu_extra_as_a_non_root_user():
    text = _dockerfile()
    extras = set(re.findall(r'pip install "\.\[([a-z,]+)\]"', text))
    assert extras == {"gpu"}, extras
    gpu = _pyproject()["project"]["optional-dependencies"]["gpu"]
    assert any(d.startswith("onnxruntime-gpu==") for d in gpu)
    assert not any(re.match(r"onnxruntime[=<>]", d) for d in gpu)  # never beside the CPU package
    assert re.search(r"^FROM nvidia/cuda:12\.[0-9.]+-cudnn-runtime-", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in {"root", "0"}
    for src in re.findall(r"^COPY (?:--\S+ )?(.+) \S+$", text, re.M):
        for item in src.split():
            assert (REPO / item).exists(), f"Dockerfile copies missing {item}"


def test_gpu_deployment_runs_in_the_images_checkout():
    env = _gpu_deployment()["work_pool"]["job_variables"]["env"]
    text = _dockerfile()
    workdir = re.findall(r"^WORKDIR (\S+)", text, re.M)[-1]
    assert f"FINESTYLE_CHECKOUT={workdir}" in text
    assert env["FINESTYLE_CHECKOUT"] == workdir
    assert "COPY prefect.yaml" in text and "COPY flows" in text


def test_kubernetes_template_asks_for_one_gpu():
    tpl = json.loads((REPO / "deploy" / "k8s-gpu-job-template.json").read_text())
    (container,) = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == "{{ image }}"


def test_pull_step_has_no_unsupported_template_filters():
    # Prefect substitutes {{ $VAR }} and {{ step.output }} but has no filters such as `default(...)`
    text = (REPO / "prefect.yaml").read_text()
    assert not re.search(r"\{\{[^}]*\|", text), "prefect.yaml: Prefect templating has no filters"
    spec = yaml.safe_load(text)
    steps = [next(iter(s)) for s in spec["pull"]]
    assert steps[-1] == "prefect.deployments.steps.set_working_directory"

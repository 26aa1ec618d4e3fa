"""The README's "Running in production" commands, run as written against a real Prefect server and worker.

The commands are read from the README's first code block under that heading, so the README cannot
drift from what is tested. What differs from a user's shell: the server listens on a free loopback
port (`PREFECT_SERVER_API_PORT`, and the `export PREFECT_API_URL=...` line points there), the Prefect
home is a temporary folder, and the commands run in a copy of the checkout, so that the runs' outputs
(`runs/`, `data/prepared/`) land there and not in the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from tests.conftest import REPO, doc_section, free_port

pytestmark = pytest.mark.slow

CHECKOUT_ITEMS = [
    "finestyle",
    "flows",
    "configs",
    "deploy",
    "data/examples",
    "prefect.yaml",
    "pyproject.toml",
]


def readme_production_commands() -> list[str]:
    section = doc_section("## Running in production (Prefect)")
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README: no bash block under 'Running in production (Prefect)'"
    return [ln.split("  #")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]


def _free_port() -> int:
    return free_port()


def _copy_checkout(dst: Path) -> None:
    for item in CHECKOUT_ITEMS:
        src = REPO / item
        target = dst / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, target)


class Shell:
    """Runs README lines in one folder with one environment; background lines are kept to be stopped."""

    def __init__(self, cwd: Path, env: dict[str, str], logs: Path):
        self.cwd, self.env, self.logs, self.background = cwd, env, logs, []

    def run(self, line: str, timeout: float = 240) -> str:
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            self.env[key] = value
            return ""
        p = subprocess.run(
            line, shell=True, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        out = p.stdout + p.stderr
        assert p.returncode == 0, f"{line!r} exited {p.returncode}:\n{out[-3000:]}"
        return out

    def start(self, line: str) -> subprocess.Popen:
        log = open(self.logs / f"bg{len(self.background)}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            line,
            shell=True,
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.background.append((proc, log))
        return proc

    def stop_all(self) -> None:
        for proc, log in reversed(self.background):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()


def _wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _api(url: str, method: str, path: str, body: dict | None = None):
    r = httpx.request(method, url + path, json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def test_readme_production_commands_deploy_and_complete_runs_through_a_worker(tmp_path):
    commands = readme_production_commands()
    checkout = tmp_path / "checkout"
    _copy_checkout(checkout)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "FINESTYLE_CHECKOUT"}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    sh = Shell(checkout, env, logs)
    checked = []
    t0 = time.time()
    try:
        for line in commands:
            if line.startswith("export PREFECT_API_URL="):
                assert line.endswith("http://127.0.0.1:4200/api"), line
                line = f"export PREFECT_API_URL={api}"  # the test's own port
            if line.startswith("prefect server start"):
                sh.start(line)
                _wait_for(lambda: _healthy(api), 90, "the Prefect server")
            elif line.startswith("prefect worker start"):
                worker, worker_line = sh.start(line), line
                _wait_for(lambda: _worker_online(api, "local"), 60, "the worker")
            elif line.startswith("python -m flows.deployments"):
                proc = sh.start(line)
                # serving re-registers the two CPU deployments and polls for their runs from this process
                _wait_for(lambda p=proc: _served(p, sh.logs), 90, "python -m flows.deployments to serve")
                checked.append("served")
            else:
                if line == "prefect work-pool create gpu --type docker":
                    _kubernetes_pool_from_readme(sh, api)
                    checked.append("kubernetes pool")
                out = sh.run(line)
                if line == "prefect --no-prompt deploy --all":
                    _check_deployments(api, checkout)
                    checked.append("deployments")
                elif line.startswith("prefect deployment run 'finestyle-pipeline/"):
                    assert "Completed" in out, out[-2000:]
                    _check_pipeline_run(api, checkout)
                    checked.append("pipeline run")
                    _killed_worker_run_resumes(sh, worker_line, worker, api, checkout)
                    checked.append("killed worker")
                elif line.startswith("prefect deployment run 'prepare_watched/"):
                    assert "Completed" in out, out[-2000:]
                    _check_watched_run(api, checkout)
                    checked.append("watched run")
        seconds = time.time() - t0
    finally:
        sh.stop_all()
        for f in sorted(logs.iterdir()):
            sys.stdout.write(f"--- {f.name}\n{f.read_text()[-3000:]}\n")
    assert checked == [
        "kubernetes pool",
        "deployments",
        "pipeline run",
        "killed worker",
        "watched run",
        "served",
    ], checked
    assert all(p.poll() is not None for p, _ in sh.background)
    print(f"production path: {seconds:.0f} s")


def _healthy(api: str) -> bool:
    try:
        return httpx.get(api + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _worker_online(api: str, pool: str) -> bool:
    workers = _api(api, "POST", f"/work_pools/{pool}/workers/filter", {})
    return any(w.get("status") == "ONLINE" for w in workers)


def _served(proc: subprocess.Popen, logs: Path) -> bool:
    assert proc.poll() is None, "python -m flows.deployments exited"
    log = (logs / f"bg{len(list(logs.iterdir())) - 1}.log").read_text()
    return "being served" in log and all(
        n in log for n in ("finestyle-pipeline/finestyle-pipeline", "prepare_watched/prepare-watched")
    )


def _readme_kubernetes_command() -> str:
    text = doc_section("## Running in production (Prefect)")
    (line,) = [
        ln for ln in text.splitlines() if ln.startswith("prefect work-pool create gpu --type kubernetes")
    ]
    return line


def _kubernetes_pool_from_readme(sh: Shell, api: str) -> None:
    """The README's Kubernetes pool command works on the real server; then it makes way for the Docker pool."""
    sh.run(_readme_kubernetes_command())
    pool = _api(api, "GET", "/work_pools/gpu")
    assert pool["type"] == "kubernetes"
    tpl = pool["base_job_template"]
    container = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert tpl["variables"]["properties"]["image"]["default"] == _gpu_image()
    httpx.delete(api + "/work_pools/gpu", timeout=30).raise_for_status()


def _gpu_image() -> str:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    gpu = next(d for d in spec["deployments"] if d["name"] == "finestyle-pipeline-gpu")
    return gpu["work_pool"]["job_variables"]["image"]


def _check_deployments(api: str, checkout: Path) -> None:
    deps = {d["name"]: d for d in _api(api, "POST", "/deployments/filter", {})}
    assert set(deps) == {"finestyle-pipeline", "finestyle-pipeline-gpu", "prepare-watched"}, set(deps)
    assert deps["finestyle-pipeline"]["work_pool_name"] == "local"
    assert deps["prepare-watched"]["work_pool_name"] == "local"
    assert deps["finestyle-pipeline-gpu"]["work_pool_name"] == "gpu"
    assert deps["finestyle-pipeline-gpu"]["job_variables"]["image"] == _gpu_image()
    (sched,) = deps["prepare-watched"]["schedules"]
    assert sched["schedule"]["cron"] == "0 * * * *" and sched["active"]
    # the pull step falls back to the deploying checkout, recorded at deploy time
    script = deps["finestyle-pipeline"]["pull_steps"][0]["prefect.deployments.steps.run_shell_script"][
        "script"
    ]
    assert str(checkout) in script and "{{" not in script.split("FINESTYLE_CHECKOUT")[1], script


def _runs_by_deployment(api: str) -> dict[str, list[dict]]:
    names = {d["id"]: d["name"] for d in _api(api, "POST", "/deployments/filter", {})}
    out: dict[str, list[dict]] = {}
    for r in _api(api, "POST", "/flow_runs/filter", {}):
        if r.get("deployment_id") in names and r["state_type"] != "SCHEDULED":  # the cron's future runs
            out.setdefault(names[r["deployment_id"]], []).append(r)
    return out


def _artifact_keys(api: str) -> set[str]:
    return {a["key"] for a in _api(api, "POST", "/artifacts/filter", {}) if a.get("key")}


def _check_pipeline_run(api: str, checkout: Path) -> None:
    (run,) = _runs_by_deployment(api)["finestyle-pipeline"]
    assert run["state_type"] == "COMPLETED", run["state"]
    wd = checkout / "runs" / "pipeline"
    manifest = json.loads((wd / "export" / "manifest.json").read_text())
    assert manifest["files"], manifest
    assert (wd / "generated.png").stat().st_size > 0
    assert {"pipeline-summary", "prepare-concepts"} <= _artifact_keys(api)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _flow_run(api: str, run_id: str) -> dict:
    return _api(api, "GET", f"/flow_runs/{run_id}")


def _run_logs(api: str, run_id: str) -> list[str]:
    body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}
    return [r["message"] for r in _api(api, "POST", "/logs/filter", body)]


def _all_logs(api: str) -> list[str]:
    logs: list[str] = []
    while page := _api(api, "POST", "/logs/filter", {"offset": len(logs), "limit": 200}):
        logs += [r["message"] for r in page]
    return logs


def _killed_worker_run_resumes(
    sh: Shell, worker_line: str, worker: subprocess.Popen, api: str, checkout: Path
) -> None:
    """The worker (and the flow run it started) is SIGKILLed during training, as when its machine
    dies. A second worker takes a new run of the same deployment: it resumes from the newest
    checkpoint, ends Completed, and its adapter equals the uninterrupted run's bit for bit. The
    killed run, left Running, is cancelled with the documented command."""
    from safetensors.torch import load_file

    dep = _api(api, "GET", "/deployments/name/finestyle-pipeline/finestyle-pipeline")
    params = json.loads(json.dumps(dep["parameters"]))
    params["config"]["workdir"] = "runs/pipeline-killed"
    params["config"]["train"]["checkpoint_every"] = 10  # a checkpoint early in the run, to kill after
    run1 = _api(api, "POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})["id"]
    wd = checkout / "runs" / "pipeline-killed"
    _wait_for(lambda: list(wd.glob("train/*/checkpoints/step-*/state.json")), 240, "a first checkpoint")
    for pid in [worker.pid, *_descendants(worker.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.wait()
    assert not list(wd.glob("train/*/adapter")), "the run finished before it could be killed"
    killed_at = max(p.parent.name for p in wd.glob("train/*/checkpoints/step-*/state.json"))
    assert _flow_run(api, run1)["state_type"] == "RUNNING"  # nothing told the server
    sh.start(worker_line)  # a second worker on the same pool
    run2 = _api(api, "POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})["id"]
    _wait_for(lambda: _flow_run(api, run2)["state_type"] in ("COMPLETED", "FAILED", "CRASHED"), 300, "run 2")
    assert _flow_run(api, run2)["state_type"] == "COMPLETED", _run_logs(api, run2)[-20:]
    # the training subflow's log (run 1 and the README's run never resume); logs reach the API in
    # batches, possibly after the run's Completed state
    _wait_for(
        lambda: any(f"train: resumed from {killed_at}" in m for m in _all_logs(api)),
        30,
        f"run 2's log to say it resumed from {killed_at}",
    )
    (resumed,) = wd.glob("train/*/adapter/pytorch_lora_weights.safetensors")
    (whole,) = (checkout / "runs" / "pipeline").glob("train/*/adapter/pytorch_lora_weights.safetensors")
    a, b = load_file(resumed), load_file(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the docs' command for the run the dead worker left Running
    sh.run(f"prefect flow-run cancel {run1}")
    _wait_for(lambda: _flow_run(api, run1)["state_type"] != "RUNNING", 60, "the killed run to be cancelled")


def _check_watched_run(api: str, checkout: Path) -> None:
    (run,) = _runs_by_deployment(api)["prepare-watched"]
    assert run["state_type"] == "COMPLETED", run["state"]
    ds = checkout / "data" / "prepared" / "paper-cut"
    assert (ds / "report.json").is_file(), sorted(p.name for p in ds.parent.iterdir())
    assert {"watched-folders", "watched-summary"} <= _artifact_keys(api)
    logs = _all_logs(api)
    assert any("prepare:" in m for m in logs), "the prepare stage's messages reach the run logs"
    assert not [m for m in logs if "LOAD_GLOBAL" in m], "bytecode listings in the run logs"

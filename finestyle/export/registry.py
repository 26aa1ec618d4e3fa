"""`export --register mlflow[:NAME]`: an export as a registered MLflow model version, with its lineage.

The version is an MLflow pyfunc model whose code is `finestyle/export/mlflow_model.py` (MLflow's
"models from code": nothing is pickled) and whose one artifact is the export folder itself; loading it
(`mlflow.pyfunc.load_model("models:/NAME/N")`, `mlflow models serve`) generates with the project's
runtime, as `finestyle generate` does. Its tags carry the manifest's sha256, the parity figures, the
base model and the adapter's and dataset's content keys, and the eval figures where the export has
them. When the adapter's training run was tracked in MLflow, the version is logged into that run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finestyle.artifacts.manifest import verify_export
from finestyle.core.errors import UserError
from finestyle.core.fs import sha256_file
from finestyle.core.tracking import artifact_root, mlflow_uri, read_identity, require

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
EXPORT_ARTIFACT = "export"


def parse_register(spec: str) -> str | None:
    """`mlflow` or `mlflow:NAME` -> NAME ("" for the default); anything else is refused."""
    kind, _, name = spec.partition(":")
    if kind != "mlflow":
        raise UserError(f"--register {spec!r}: use mlflow or mlflow:NAME (MLflow's model registry)")
    return name


def version_tags(export_dir: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """What a registered version says of its export: hashes, parity, base, adapter and dataset keys, eval."""
    tags = {
        "finestyle.manifest_sha256": sha256_file(export_dir / "manifest.json"),
        "finestyle.export_key": str(manifest.get("cache_key")),
        "finestyle.base_model": str(manifest.get("base_model")),
        "finestyle.adapter_key": str(manifest.get("adapter_fingerprint")),
        "finestyle.style": str(manifest.get("style")),
        "finestyle.precision": str(manifest.get("precision")),
    }
    info_path = Path(str(manifest.get("adapter") or "")) / "finestyle_adapter.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        tags["finestyle.dataset_key"] = str(info.get("dataset_fingerprint", info.get("dataset_key", "")))
    for k, v in (manifest.get("parity") or {}).items():
        diff = v.get("max_abs_diff") if isinstance(v, dict) else v
        if isinstance(diff, (int, float)):
            tags[f"finestyle.parity.{k}_max_abs_diff"] = f"{diff:.3g}"
    for k, v in (manifest.get("eval") or {}).items():
        if isinstance(v, (int, float)):
            tags[f"finestyle.eval.{k}"] = f"{v:.4g}"
    return tags


def _training_run(manifest: dict[str, Any]) -> dict[str, Any]:
    """The MLflow identity of the run that trained the export's adapter (OUT/tracking.json), if tracked."""
    adapter = manifest.get("adapter")
    if not adapter:
        return {}
    ident = read_identity(Path(adapter).parent)
    return ident if ident.get("mlflow_run_id") else {}


def register_export(export_dir: str | Path, spec: str, uri: str = "", log=print) -> dict[str, Any]:
    """Register `export_dir` in MLflow's model registry; returns name, version, run id and tracking URI."""
    require("mlflow", "--register")
    import mlflow

    export_dir = Path(export_dir).absolute()
    manifest = verify_export(export_dir)
    name = parse_register(spec) or f"finestyle-{(manifest.get('style') or 'export').replace(' ', '-')}"
    trained = _training_run(manifest)
    tracking_uri = uri or trained.get("mlflow_uri") or mlflow_uri("", export_dir.parent)
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.active_run() is not None:
        mlflow.end_run()
    same_run = trained.get("mlflow_uri") == tracking_uri
    if not same_run:
        if mlflow.get_experiment_by_name("finestyle") is None:
            mlflow.create_experiment(
                "finestyle", artifact_location=artifact_root(tracking_uri, export_dir.parent)
            )
        mlflow.set_experiment("finestyle")
    tags = version_tags(export_dir, manifest)
    with mlflow.start_run(run_id=trained["mlflow_run_id"] if same_run else None) as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={EXPORT_ARTIFACT: str(export_dir)},
            registered_model_name=name,
            pip_requirements=["finestyle"],
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    log(
        f"export: registered as MLflow model {name!r} version {version} (models:/{name}/{version}, {tracking_uri})"
    )
    return {"name": name, "version": version, "run_id": run.info.run_id, "tracking_uri": tracking_uri}


def resolve_model_uri(uri: str) -> str:
    """`models:/NAME/N` -> the local export folder of that registered version (downloaded by MLflow)."""
    require("mlflow", uri)
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # MLflow's own errors: unknown name or version, unreachable store
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{uri}: MLflow cannot provide it ({first}); check the name, version and MLFLOW_TRACKING_URI"
        ) from exc
    # MLflow stores an artifact folder under its source folder's own name (the export's), not the key
    found = sorted(p.parent for p in (local / "artifacts").glob("*/manifest.json"))
    if len(found) != 1:
        raise UserError(f"{uri}: not a FineStyle export registered with `finestyle export --register`")
    return str(found[0])

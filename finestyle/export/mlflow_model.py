"""The MLflow pyfunc model of a registered FineStyle export (MLflow's "models from code": MLflow runs this
file at load time, so nothing is pickled).

Input: a DataFrame (or a list of dicts) with a `prompt` column and any of `generate`'s request options
(`negative_prompt`, `seed`, `steps`, `guidance`, `style_guidance`, `width`, `height`, `scheduler`,
`style`); output: one base64 PNG per row. The same options and seed give the image `finestyle generate`
gives on the same runtime (`auto` by default; the model config's `runtime` picks another).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class FineStyleExport(PythonModel):
    """Loads the export with the project's runtime; generates one image per input row."""

    def load_context(self, context: Any) -> None:
        from finestyle.runtime.generate import load_backend

        runtime = (getattr(context, "model_config", None) or {}).get("runtime", "auto")
        self.backend = load_backend(context.artifacts["export"], runtime)

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        from finestyle.config import GenerateConfig
        from finestyle.runtime.generate import generate, negative_with_exclusions

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        out = []
        for row in rows:
            opts = {k: v for k, v in {**(params or {}), **row}.items() if v is not None}
            cfg = GenerateConfig(model="", out="", **opts)
            req = cfg.request(negative_with_exclusions(cfg.negative_prompt, cfg.exclude_concepts))
            for im in generate(self.backend, req):
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                out.append(base64.b64encode(buf.getvalue()).decode())
        return out


mlflow.models.set_model(FineStyleExport())

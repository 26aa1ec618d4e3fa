"""One configuration dataclass per stage (stages.py) over a small base (base.py).

Imports core only.
"""

from finestyle.config.base import (
    field_docs,
    from_dict,
    keyed_fields,
    load_yaml,
    stage_from_sources,
    to_dict,
    unkeyed,
)
from finestyle.config.stages import (
    DEFAULT_STYLE,
    EMPTY_PROMPT,
    SCHEDULERS,
    TARGET_PRESETS,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    PipelineConfig,
    PrepareConfig,
    RequestOptions,
    ServeConfig,
    TrainConfig,
    load_pipeline_config,
)

__all__ = [
    "DEFAULT_STYLE",
    "EMPTY_PROMPT",
    "SCHEDULERS",
    "TARGET_PRESETS",
    "EvalConfig",
    "ExportConfig",
    "GenerateConfig",
    "PipelineConfig",
    "PrepareConfig",
    "RequestOptions",
    "ServeConfig",
    "TrainConfig",
    "field_docs",
    "from_dict",
    "keyed_fields",
    "load_pipeline_config",
    "load_yaml",
    "stage_from_sources",
    "to_dict",
    "unkeyed",
]

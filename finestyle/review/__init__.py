"""`finestyle review`: a person looks at, fixes and approves a dataset's rows before training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

FLOW_RUN_DECIDERS: dict[str, Callable[[str], Callable[[dict[str, Any]], str | None]]] = {}
"""`review --flow-run ID`'s decider factories, registered by the orchestration layer (`flows.cli`
registers Prefect's), so that the library itself never imports the orchestrator."""

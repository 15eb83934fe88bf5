"""Run the ``hierarchical-merge`` flow from the command line, on Prefect's embedded default.

With no ``PREFECT_API_URL`` set, calling the flow starts Prefect's ephemeral mode: a temporary server in a
subprocess with its SQLite database under ``PREFECT_HOME`` (default ``~/.prefect``), gone when the run
ends. With ``PREFECT_API_URL`` set, the run is recorded on that server and shows in its UI. Either way
the models, the checkpoint store and the report are local files next to the config's output.

The settings below are defaults only (a value the user exported wins): no telemetry, a start-up
timeout that a 2-core machine meets (the ephemeral server took 11-16 s there; Prefect's own default is
20 s), and supermerge's own logs in the flow run's log. They must be in the environment before Prefect is imported, so this module imports it late.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PREFECT_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "supermerge",
    # those loggers also serve merges outside a flow run in the same process (the demo's baselines)
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def run_flow(config: Path, **parameters: Any) -> dict[str, Any]:
    """Run ``hierarchical-merge`` on ``config`` in this process; the flow's result dict. A failed
    flow raises the failing node's own error (a SupermergeError prints as one line in the CLI)."""
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from supermerge.flows.hierarchical import hierarchical_merge

    return hierarchical_merge(config=str(Path(config).resolve()), **parameters)

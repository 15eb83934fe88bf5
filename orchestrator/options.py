"""A merge config with the ``supermerge merge`` options applied: one place below the CLI and the flow.

The options are the ones both run paths take (``--output``, ``--method``, ``--device``,
``--memory-budget``, ``--max-fan-in``, ``--flat``, ``--store``); they are applied to the resolved config, which is
then validated again as a whole.
"""

from __future__ import annotations

import logging
from pathlib import Path

from supermerge.merge_core.config import MergeConfig, load_config, parse_config

log = logging.getLogger(__name__)


def load_merge_config(
    config_path: Path,
    *,
    output: Path | None = None,
    method: str | None = None,
    device: str | None = None,
    memory_budget: str | None = None,
    max_fan_in: int | None = None,
    flat: bool = False,
    store: str | None = None,
) -> MergeConfig:
    """The config with the command line's (or the flow's) overrides, validated again as a whole (one
    ConfigError): both run paths read a config through here, so an option means the same on each.
    ``store``: a folder (relative to the working directory) or an ``s3://`` URL."""
    overrides = {"output": str(output.resolve()) if output else None, "device": device}
    config = load_config(config_path, overrides)
    raw = config.resolved()
    if config.max_length_resolved.source != "config":
        raw["max_length"] = None  # resolved again, so the plan still says where it came from
    if method is not None and method != config.method:
        # the config's parameters belong to its own method: another method starts from its defaults
        if config.parameters:
            log.warning("--method %s: ignoring the config's parameters for %s", method, config.method)
        raw.update(method=method, parameters={})
    tree = dict(raw["tree"])
    if memory_budget is not None:
        tree["memory_budget"] = memory_budget
    if flat:
        tree.update(flat=True, groups=None, max_fan_in=None)
    if max_fan_in is not None:
        tree.update(max_fan_in=max_fan_in, flat=False)
    raw["tree"] = tree
    if store is not None:
        raw["store"] = store if "://" in store else str(Path(store).resolve())
    return parse_config(raw, source=f"{config_path} (with the command line's options)")

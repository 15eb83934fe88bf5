"""The ``supermerge merge`` options as one typed object, and the config with them applied.

Both run paths (the CLI's plain executor and the ``hierarchical-merge`` flow) take the same options;
they travel as one ``MergeOptions`` from the command line (or the flow's parameters) down to
``supermerge.orchestrator.run.prepare``, and are applied to the resolved YAML mapping once, which is
then validated as a whole (one ConfigError naming the config and the options).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supermerge.merge_core.config import DEFAULT_METHOD, MergeConfig, parse_config, read_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeOptions:
    """What the command line (or the flow's parameters) says beside the config; None: the config's."""

    output: Path | None = None
    method: str | None = None
    device: str | None = None
    memory_budget: str | None = None
    max_fan_in: int | None = None
    flat: bool = False
    store: str | None = None
    """A folder (relative to the working directory) or an ``s3://`` URL."""
    overwrite: bool = False
    """Replace an existing output (an unversioned run)."""
    replan: bool = False
    """Cluster from scratch instead of growing the tree published at the output."""

    def flow_parameters(self) -> dict[str, Any]:
        """The ``hierarchical-merge`` flow's parameters for these options (JSON values)."""
        values = dataclasses.asdict(self)
        values["output"] = str(self.output.resolve()) if self.output is not None else None
        return values

    @classmethod
    def from_flow_parameters(cls, **values: Any) -> MergeOptions:
        """The options the flow's parameters carry (``flow_parameters`` read back)."""
        output = values.pop("output", None)
        return cls(output=Path(output) if output else None, **values)


def load_merge_config(config_path: Path, options: MergeOptions = MergeOptions()) -> MergeConfig:
    """The config at ``config_path`` with ``options`` applied to its mapping, then validated once as a
    whole: both run paths and ``supermerge plan`` read a config through here, so an option means the
    same on each."""
    overrides = {"output": str(options.output.resolve()) if options.output else None, "device": options.device}
    raw, root = read_config(config_path, overrides)
    if options.method is not None and options.method != raw.get("method", DEFAULT_METHOD):
        # the config's parameters belong to its own method: another method starts from its defaults
        if raw.get("parameters"):
            log.warning("--method %s: ignoring the config's parameters for %s", options.method,
                        raw.get("method", DEFAULT_METHOD))
        raw = {**raw, "method": options.method, "parameters": {}}
    tree = dict(raw.get("tree") or {})
    if options.memory_budget is not None:
        tree["memory_budget"] = options.memory_budget
    if options.flat:
        tree.update(flat=True, groups=None, max_fan_in=None)
    if options.max_fan_in is not None:
        tree.update(max_fan_in=options.max_fan_in, flat=False)
    if tree or "tree" in raw:
        raw = {**raw, "tree": tree}
    if options.store is not None:
        raw = {**raw, "store": options.store if "://" in options.store else str(Path(options.store).resolve())}
    return parse_config(raw, root=root, source=str(config_path))

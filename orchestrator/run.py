"""The one run path of a merge: prepare, run the nodes, conclude.

    prepare(config, options)      check the output once, plan (growing the published tree), open the store
    run the nodes                 executor.run_nodes here, or one Prefect task per node (flows/)
    conclude(prepared, records)   score the root with score_model, publish it, switch a versioned output

``supermerge merge``, ``supermerge merge --prefect``, the ``hierarchical-merge`` flow (and so the
deployment) all go through these three, so after a new model is registered every one of them grows
the same tree, scores the same way and publishes the same bytes. ``supermerge plan`` shows the tree
``plan_for`` gives, the one a merge would run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from supermerge.merge_core.checkpoint import open_checkpoint, output_problem
from supermerge.merge_core.config import MergeConfig
from supermerge.merge_core.errors import CheckpointError, DataError
from supermerge.merge_core.evaluate import evaluate
from supermerge.merge_core.job import DataCache
from supermerge.merge_core.model import FunctionalModel
from supermerge.merge_core.task_vectors import load_stored_heads, mergeable_names
from supermerge.orchestrator.incremental import plan_with_previous
from supermerge.orchestrator.node import NodeRecord
from supermerge.orchestrator.options import MergeOptions
from supermerge.orchestrator.plan import MergePlan
from supermerge.orchestrator.publish import ExecutionReport, publish
from supermerge.orchestrator.store import Store
from supermerge.orchestrator.stores import STORE_DIR, config_store
from supermerge.orchestrator.versions import (check_versioned, current, next_version, prune, published_root_key,
                                              switch_current)


@dataclass(frozen=True)
class Prepared:
    """A run ready for its nodes: the plan, its store, and where the root will be published."""

    plan: MergePlan
    store: Store
    target: Path
    """The output, or its next version ``<output>/v<N>`` when the run keeps versions."""
    overwrite: bool = False
    versions: int = 0
    published: Path | None = None
    """A versioned output's current version (the tree it holds is the one grown)."""

    @property
    def up_to_date(self) -> bool:
        """The versioned output's current version holds this tree's root already: nothing to run."""
        return self.published is not None and published_root_key(self.published) == self.plan.root.key


def check_output(output: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, an output that cannot be written (``output_problem``) or that is the
    checkpoint store beside it, or inside it (the store would be replaced by the merged model)."""
    problem = output_problem(output, overwrite=overwrite)
    if problem is None and STORE_DIR in output.parts:
        problem = (f"{output} is the checkpoint store beside it ({STORE_DIR}) or inside one, which holds the merge's "
                   "intermediate models; choose an output outside it")
    if problem is not None:
        raise CheckpointError(problem)


def plan_for(config: MergeConfig, options: MergeOptions, *, published: Path | None = None,
             progress: bool = False) -> MergePlan:
    """The plan a run of ``config`` follows: the tree published at the output (``published``: a
    versioned output's current version) grown by newly registered models, unless ``options.replan``."""
    return plan_with_previous(config, replan=options.replan, published=published, progress=progress)


def prepare(config: MergeConfig, options: MergeOptions, *, versions: int = 0, progress: bool = False) -> Prepared:
    """Check the output once, plan, open the store. ``versions``: publish as ``<output>/v<N>`` keeping
    this many (0: at the output itself, refused when it exists unless ``options.overwrite``)."""
    published = None
    if versions:
        check_versioned(config.output)
        published = current(config.output)
    else:
        check_output(config.output, overwrite=options.overwrite)
    merge_plan = plan_for(config, options, published=published, progress=progress)
    target = next_version(config.output) if versions else config.output
    return Prepared(merge_plan, config_store(config), target, options.overwrite, versions, published)


def prepared_plan(merge_plan: MergePlan, store: Store, *, overwrite: bool = False) -> Prepared:
    """A plan made elsewhere (a benchmark's, a test's) ready to run, its output checked once."""
    check_output(merge_plan.config.output, overwrite=overwrite)
    return Prepared(merge_plan, store, merge_plan.config.output, overwrite)


def conclude(prepared: Prepared, records: list[NodeRecord], seconds: float, *,
             evaluate_test: bool = True) -> ExecutionReport:
    """Score the finished root on the config's test data (``evaluate_test``) and publish it at the
    target; a versioned output then points ``current`` at it and keeps the newest versions."""
    merge_plan = dataclasses.replace(
        prepared.plan, config=prepared.plan.config.model_copy(update={"output": prepared.target})
    )
    prepared.store.record(merge_plan.root.key)  # an S3 store's root, merged on another worker, into the local cache
    test = (score_model(merge_plan.config, Path(prepared.store.path(merge_plan.root.key)), merge_plan.root.device,
                        data=merge_plan.data) if evaluate_test else {})
    report = publish(merge_plan, prepared.store, records, seconds,
                     overwrite=prepared.overwrite and not prepared.versions, test_accuracy=test)
    if prepared.versions:
        output = prepared.plan.config.output
        switch_current(output, prepared.target)
        prune(output, prepared.versions)
    return report


def score_model(config: MergeConfig, model_dir: Path, device: str, *, data: DataCache | None = None) -> dict[str, float]:
    """Test accuracy of a merged model dir on every config task with test data (each with its head
    from ``heads/``); empty when no model has test data. ``data``: the run's data files (the plan's,
    which read the test data already)."""
    test = (data if data is not None else DataCache()).split(config.models, "test", config.base, config.max_length)
    if not test:
        return {}
    heads = load_stored_heads(model_dir)
    missing = sorted(set(test) - set(heads))
    if missing:
        raise DataError(f"{model_dir} has no head for task(s) {missing} under heads/, so their test data "
                        "cannot be scored; was it merged from these models?")
    model = FunctionalModel(config.base, config.kind, device)
    with open_checkpoint(config.base) as base, open_checkpoint(model_dir) as merged:
        params = {n: merged.get(n).to(model.device, torch.float32) for n in mergeable_names(base)}
    on_device = {t: {n: x.to(model.device) for n, x in heads[t].items()} for t in test}
    return evaluate(model, params, on_device, test)

"""The README's end-to-end demo: real pretrained model, real tasks, a merge tree run by Prefect.

The packaged all-MiniLM-L6-v2 is fine-tuned briefly on four real tasks (language of a quotation,
movie-review sentiment, plot-or-review subjectivity, topic of a quotation). Hierarchical SuperMerge then
runs as the Prefect flow ``hierarchical-merge`` on Prefect's embedded default (an ephemeral server, local
files): the task vectors are clustered into a tree of fan-in 2, one Prefect task per merge node.
Task Arithmetic, TIES and the 2025 training-free merges (TSV-M, Iso-C, Iso-CTS, WUDI) merge the same
models flat, through the plain executor, for comparison; the training-free one with the best validation
accuracy is shown beside SuperMerge, TA and TIES (chosen on validation data, like its scale alpha), and
every merged model is scored on held-out test data next to the pretrained model and the individual
fine-tunes. Fine-tunes and finished merge nodes are cached in the workdir, so a second run only scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from supermerge.merge_core.workload import WorkloadConfig, prepare_workload, write_merge_config
from supermerge.merge_core.config import load_config
from supermerge.merge_core.evaluate import results_table
from supermerge.merge_core.job import score_models

DEMO = WorkloadConfig(tasks=("language", "sentiment", "subjectivity", "quote_topic"), n_train=480, n_test=300,
                      max_length=48, epochs=2.0)
BASELINES = ("task_arithmetic", "ties")
TRAINING_FREE_2025 = ("tsv", "iso_c", "iso_cts", "wudi")
"""The demo shows the one of these with the best mean validation accuracy."""


def run_demo(workdir: Path, *, steps: int = 40, progress: bool = True) -> str:
    """Prepare the tasks, run the flow and the baselines, return the results (markdown)."""
    from supermerge.flows.local import run_flow
    from supermerge.orchestrator.executor import execute
    from supermerge.orchestrator.plan import plan

    workdir.mkdir(parents=True, exist_ok=True)
    tasks = prepare_workload(workdir, DEMO, progress=progress)
    config = write_merge_config(workdir / "supermerge.yaml", tasks, method="supermerge", output="merged/supermerge",
                                parameters={"steps": steps, "batch_size": 8}, max_length=DEMO.max_length,
                                seed=DEMO.seed, tree={"max_fan_in": 2})
    flow = run_flow(config, overwrite=True)
    merged: dict[str, Path] = {"supermerge": Path(flow["output"])}
    val: dict[str, float] = {}
    for method in (*BASELINES, *TRAINING_FREE_2025):
        path = write_merge_config(workdir / f"{method}.yaml", tasks, method=method, output=f"merged/{method}",
                                  parameters={"search": True}, max_length=DEMO.max_length, seed=DEMO.seed,
                                  tree={"flat": True})
        merged[method] = execute(plan(load_config(path)), overwrite=True, progress=progress).output
        node_val = json.loads((merged[method] / "merge_report.json").read_text())["nodes"][-1]["val_accuracy"]
        val[method] = sum(node_val.values()) / len(node_val)
    best = max(TRAINING_FREE_2025, key=val.__getitem__)
    for method in TRAINING_FREE_2025:
        if method != best:
            del merged[method]
    refs = {"pretrained": None, "individual": None}
    scores = score_models(load_config(config), {**refs, **merged}, progress=progress)
    table = results_table(
        {m: scores[m] for m in merged}, references={r: scores[r] for r in refs}, individual=scores["individual"]
    )
    report = json.loads((merged["supermerge"] / "merge_report.json").read_text())
    return (
        f"Hierarchical SuperMerge ran as the Prefect flow hierarchical-merge: tree {report['plan']['groups']}, "
        f"{flow['merged']} node(s) merged and {flow['from_store']} taken from the store in {flow['seconds']:.0f} s. "
        f"Task Arithmetic, TIES and {', '.join(TRAINING_FREE_2025)}: one flat merge each, hyperparameters chosen "
        f"on the validation data; {best} shown, the best of the 2025 training-free merges on validation "
        f"({', '.join(f'{m} {100 * val[m]:.1f}' for m in TRAINING_FREE_2025)} % mean validation accuracy).\n\n"
        f"Test accuracy (%) of the merged MiniLM, {DEMO.n_test} held-out examples a task; rank among the "
        f"merges in brackets.\n\n{table}\n\nModels, data and configs: {workdir.resolve()} "
        f"(run the flow again: supermerge merge {workdir / 'supermerge.yaml'} --prefect --overwrite)"
    )

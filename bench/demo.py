"""The README's end-to-end demo: real pretrained model, real tasks, real merges, the paper's table.

The packaged all-MiniLM-L6-v2 is fine-tuned briefly on two real tasks (language of a quotation and
movie-review sentiment), then merged with several methods through the same ``run_merge`` the CLI uses,
and every merged model is scored on held-out test data next to the pretrained model and the
individual fine-tunes. Fine-tunes are cached in the workdir, so a second run only merges.
"""

from __future__ import annotations

from pathlib import Path

from bench.workload import WorkloadConfig, prepare_workload, write_merge_config
from merge_core.config import load_config
from merge_core.evaluate import results_table
from merge_core.job import run_merge, score_models

DEMO = WorkloadConfig(tasks=("language", "sentiment"), n_train=640, n_test=300, max_length=48, epochs=2.0)
METHODS = ("average", "task_arithmetic", "ties", "supermerge")


def run_demo(workdir: Path, *, steps: int = 60, progress: bool = True) -> str:
    """Prepare the tasks, merge with each method, return the results table (markdown)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tasks = prepare_workload(workdir, DEMO, progress=progress)
    merged: dict[str, Path] = {}
    for method in METHODS:
        params = {"steps": steps} if method == "supermerge" else {}
        path = write_merge_config(workdir / f"{method}.yaml", tasks, method=method, output=f"merged/{method}",
                                  parameters=params, max_length=DEMO.max_length, seed=DEMO.seed)
        report = run_merge(load_config(path), overwrite=True, progress=progress)
        merged[method] = report.output
    config = load_config(workdir / "supermerge.yaml")
    refs = {"pretrained": None, "individual": None}
    scores = score_models(config, {**refs, **merged}, progress=progress)
    table = results_table(
        {m: scores[m] for m in merged}, references={r: scores[r] for r in refs}, individual=scores["individual"]
    )
    return (
        f"Test accuracy (%) of the merged MiniLM, {DEMO.n_test} held-out examples a task; rank among the "
        f"merges in brackets.\n\n{table}\n\nModels, data and configs: {workdir.resolve()} "
        f"(re-run one merge: supermerge merge {workdir / 'supermerge.yaml'} --overwrite)"
    )

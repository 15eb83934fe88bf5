"""``supermerge``: merge fine-tuned copies of one pretrained model into one multi-task model.

The CLI sits at the top of the import graph (flows -> orchestrator -> merge_core) so one entry point
serves planning, merges (a flat merge is a tree of one node) and evaluation. Each subcommand is a typed
function; argparse only maps flags onto it. Errors supermerge raises on purpose print as one line (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from supermerge.flows.console import os_error_line
from supermerge.merge_core.errors import SupermergeError

if TYPE_CHECKING:  # imported where used: `supermerge --help` stays quick
    from supermerge.merge_core.config import MergeConfig
    from supermerge.orchestrator.options import MergeOptions

log = logging.getLogger("supermerge")

EXAMPLE_CONFIG = """\
example config (paths relative to the config file):

  base: models/base                 # HF model dir or .safetensors of the pretrained model
  output: merged/supermerge         # written atomically; refused if it exists (use --overwrite)
  method: supermerge                # see `supermerge methods`
  parameters: {steps: 100, lr: 0.05}  # left out: the defaults; a list value (or search: true) is searched
  max_length: 128                   # tokens per example for merge training and evaluation; left out: the length
                                    # the fine-tunes record (supermerge-finetune.json), else 64 (`plan` says which)
  models:
    - name: sentiment
      path: models/sentiment        # full fine-tune dir, .safetensors, or a PEFT LoRA/IA3 adapter dir
      validation: data/sentiment.val.jsonl   # {"text": ..., "label": 2} per line: the class id (it indexes the head's
                                             # logits), or a class name of the fine-tune's config.json id2label
      test: data/sentiment.test.jsonl
    - name: language
      path: models/language
      validation: data/language.val.jsonl
  tree: {max_fan_in: 4, memory_budget: 8GB}  # optional; `supermerge plan` shows the tree and its memory
"""


def cmd_plan(config_path: Path, options: MergeOptions) -> int:
    """Print the merge tree a merge would run (the published one grown by new models, unless
    ``--replan``), each node's predicted peak memory and device, the fan-in chosen, and the
    checkpoint store's size."""
    from supermerge.orchestrator.options import load_merge_config
    from supermerge.orchestrator.run import plan_for
    from supermerge.orchestrator.store_usage import store_usage
    from supermerge.orchestrator.stores import store_location

    config = load_merge_config(config_path, options)
    print(plan_for(config, options, progress=True).render())
    location = store_location(config)
    print(f"store: {location}" if "://" in str(location) else store_usage(Path(location)).render())
    return 0


def cmd_merge(config_path: Path, options: MergeOptions, *, prefect: bool = False) -> int:
    """Plan the merge tree (refusing before any work if it cannot fit), run it bottom-up through the
    checkpoint store, and print where the result is and how well it scores. ``prefect``: run it as the
    ``hierarchical-merge`` flow (Prefect's embedded default, or the server at PREFECT_API_URL)."""
    from supermerge.orchestrator.options import load_merge_config

    config = load_merge_config(config_path, options)
    if prefect:
        return _merge_with_prefect(config_path, config, options)
    from supermerge.orchestrator.executor import execute_prepared
    from supermerge.orchestrator.publish import REPORT_FILE
    from supermerge.orchestrator.run import prepare
    from supermerge.orchestrator.sizes import format_bytes

    prepared = prepare(config, options, progress=True)
    merge_plan = prepared.plan
    created = _missing_folders(config.output.parent)
    try:
        report = execute_prepared(prepared, progress=True)
    except BaseException:
        for folder in created:  # the run made them (for the store and the output): leave none behind
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: a store entry or another run's output keeps it
        raise
    method_name = merge_plan.root.method
    print(f"merged {len(config.models)} models with {method_name} in {report.seconds:.1f} s -> {report.output}")
    reused = sum(r.cached for r in report.nodes)
    worst = max(report.nodes, key=lambda r: r.measured_peak_bytes)
    print(f"tree: {len(report.nodes)} merge(s), fan-in {merge_plan.fan_in}, depth {merge_plan.tree.depth}"
          + (f", {reused} reused from the store" if reused else "")
          + f"; largest node peak {format_bytes(worst.measured_peak_bytes)} ({worst.id}, predicted "
          f"{format_bytes(worst.predicted_peak_bytes)}); per node: {report.output / REPORT_FILE}")
    if report.params:
        print("parameters: " + ", ".join(f"{k}={v}" for k, v in sorted(report.params.items())))
    if report.val_accuracy:
        print("validation accuracy: " + _fmt(report.val_accuracy))
    if report.test_accuracy:
        print("test accuracy:       " + _fmt(report.test_accuracy))
    from supermerge.orchestrator.store_usage import store_usage

    if report.store_location is not None and "://" in report.store_location:
        print(f"store: {report.store_location} (local copies in {report.store})")
    else:
        print(store_usage(report.store).render())
    return 0


def cmd_export(merged: Path, *, task: str | None, every: bool, out: Path, overwrite: bool) -> int:
    """Write one task (or every task) of a merged model as a standard Hugging Face classifier dir."""
    from supermerge.merge_core.export import export_all, export_task

    if every == (task is not None):
        raise SupermergeError("give either --task NAME or --all")
    dirs = export_all(merged, out, overwrite=overwrite) if every else [export_task(merged, task, out, overwrite=overwrite)]
    for d in dirs:
        print(f"{d}: AutoModelForSequenceClassification.from_pretrained({str(d)!r})")
    return 0


def cmd_store_prune(config_path: Path, *, everything: bool, output: Path | None = None) -> int:
    """Remove the store entries no published output beside the config's output uses (``--all``: all)."""
    from supermerge.merge_core.config import load_config
    from supermerge.orchestrator.publish import REPORT_FILE
    from supermerge.orchestrator.store_usage import prune, store_usage, used_keys
    from supermerge.orchestrator.stores import store_location

    config = load_config(config_path, {"output": str(output.resolve()) if output else None})
    location = store_location(config)
    if "://" in str(location):
        raise SupermergeError(f"store prune covers local stores only; {location} is not one: remove its "
                              "unused <key>/ prefixes with your S3 tools (aws s3 rm --recursive)")
    root = Path(location)
    keep = set() if everything else used_keys(config.output.parent, REPORT_FILE)
    removed, freed = prune(root, keep)
    print(f"removed {removed} store entr{'y' if removed == 1 else 'ies'}, freed {freed / 1e6:.1f} MB; "
          + store_usage(root).render())
    return 0


def cmd_convert(config_path: Path, *, output: Path | None) -> int:
    """Print supermerge's config for a mergekit config (what `supermerge merge` runs for it)."""
    import yaml

    from supermerge.merge_core.config import load_config

    config = load_config(config_path, {"output": str(output.resolve()) if output else None})
    raw = config.resolved()
    raw["models"] = [{k: v for k, v in m.items() if v is not None} for m in raw["models"]]
    print(yaml.safe_dump({k: raw[k] for k in ("base", "output", "method", "parameters", "models", "tree",
                                              "dtype", "out_dtype") if raw.get(k) is not None}, sort_keys=False))
    return 0


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and the folders above it that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _merge_with_prefect(config_path: Path, config: MergeConfig, options: MergeOptions) -> int:
    from supermerge.flows.local import run_flow
    from supermerge.orchestrator.run import check_output

    check_output(config.output, overwrite=options.overwrite)  # before Prefect's server starts; the flow checks again
    result = run_flow(config_path, evaluate=True, **options.flow_parameters())
    print(f"merged with the hierarchical-merge flow in {result['seconds']:.1f} s -> {result['output']}")
    print(f"tree: {len(result['nodes'])} merge(s): {result['merged']} merged, {result['from_store']} from the store; "
          f"slots {result['slots']}; per node: {Path(result['output']) / 'merge_report.json'}")
    if result["test_accuracy"]:
        print("test accuracy:       " + _fmt(result["test_accuracy"]))
    return 0


def cmd_evaluate(config_path: Path, models: Sequence[Path], *, device: str | None, references: bool) -> int:
    """Score merged models on every task's test data and print the paper's table."""
    from supermerge.merge_core.config import load_config
    from supermerge.merge_core.evaluate import results_table
    from supermerge.merge_core.job import score_models

    config = load_config(config_path, {"device": device})
    merged = {p.name: p for p in (models or [config.output])}
    refs = {"pretrained": None, "individual": None} if references else {}
    scores = score_models(config, {**refs, **merged}, progress=True)
    print(
        results_table(
            {k: scores[k] for k in merged},
            references={k: scores[k] for k in refs},
            individual=scores.get("individual"),
        )
    )
    return 0


def cmd_methods() -> int:
    """List the merge methods with their papers, the defaults a left-out parameter takes, and the grid
    ``search: true`` searches."""
    from supermerge.merge_core.methods.registry import METHODS, parameter_defaults

    for spec in METHODS.values():
        def shown(k: str) -> str:
            return "lambda" if k == spec.scale else k  # a config names any method's scale lambda

        grid = ", ".join(f"{shown(k)}={list(v)}" for k, v in spec.grid.items())
        defaults = ", ".join(f"{shown(k)}={v}" for k, v in parameter_defaults(spec).items() if v is not None) or "none"
        print(f"{spec.name:20s} {spec.summary}\n{'':20s} {spec.paper}\n{'':20s} defaults: {defaults}"
              + (f"\n{'':20s} searched with search: true: {grid}" if grid else ""))
    return 0


def cmd_demo(workdir: Path, *, steps: int) -> int:
    """Real end-to-end run: the packaged MiniLM fine-tuned briefly on four real tasks, merged as a tree by
    the Prefect flow hierarchical-merge (embedded server), with flat baselines beside it."""
    from supermerge.flows.demo import run_demo

    print(run_demo(workdir, steps=steps, progress=True))
    return 0


def _fmt(acc: dict[str, float]) -> str:
    return ", ".join(f"{t} {100 * a:.1f}%" for t, a in sorted(acc.items()))


def options_from_args(args: argparse.Namespace) -> MergeOptions:
    """The merge options a ``merge`` or ``plan`` command line gives (``plan`` has fewer)."""
    from supermerge.orchestrator.options import MergeOptions

    return MergeOptions(output=args.output, method=getattr(args, "method", None), device=args.device,
                        memory_budget=args.memory_budget, max_fan_in=args.max_fan_in, flat=args.flat,
                        store=getattr(args, "store", None), overwrite=getattr(args, "overwrite", False),
                        replan=args.replan)


def _tree_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="memory one merge node may use, e.g. 8GB or 512MiB (default: a safe share of what is free)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--max-fan-in", type=int, metavar="N",
                       help="at most N models per merge node (the planner takes the largest that fits)")
    shape.add_argument("--flat", action="store_true", help="one merge of every model (no tree)")
    p.add_argument("--replan", action="store_true",
                   help="cluster the tree from scratch instead of growing the one published at the output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supermerge",
        description=(
            "Merge k fine-tuned copies of one pretrained model (full fine-tunes or PEFT LoRA/IA3 "
            "adapters) into one multi-task model. SuperMerge (arXiv 2412.10416) learns one tanh-bounded "
            "weight per model per tensor on a small labelled validation set; Task Arithmetic, TIES, DARE, "
            "AdaMerging and averaging are there to compare."
        ),
        epilog=EXAMPLE_CONFIG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("merge", help="merge the models a YAML config (ours or mergekit's) names", epilog=EXAMPLE_CONFIG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="YAML config (base, models, method, parameters, output)")
    p.add_argument("--output", type=Path, help="override the config's output dir")
    p.add_argument("--method", help="override the config's method (see `supermerge methods`)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    p.add_argument("--prefect", action="store_true",
                   help="run as the Prefect flow hierarchical-merge (embedded server unless PREFECT_API_URL is set)")
    p.add_argument("--store", help="the checkpoint store: a folder, or s3://bucket/prefix for workers on several "
                                   "machines (pip install 'supermerge[distributed]'); default: the config's store, "
                                   "else .supermerge-store beside the output")
    _tree_options(p)

    p = sub.add_parser("plan", help="show the merge tree, each node's predicted memory and device, the fan-in")
    p.add_argument("config", type=Path, help="YAML config (base, models, method, parameters, tree)")
    p.add_argument("--output", type=Path, help="override the config's output dir (a mergekit config needs it)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    _tree_options(p)

    p = sub.add_parser("evaluate", help="score merged models on each task's test data (the paper's table)")
    p.add_argument("config", type=Path, help="the YAML config the models were merged with")
    p.add_argument("models", type=Path, nargs="*", help="merged model dirs (default: the config's output)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-references", action="store_true",
                   help="skip the pretrained and individual fine-tuned reference rows")

    p = sub.add_parser("export", help="write one task of a merged model as a standard Hugging Face classifier dir")
    p.add_argument("merged", type=Path, help="a merged model dir (`supermerge merge`'s output)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="the task whose head to use")
    which.add_argument("--all", action="store_true", help="every task, as OUT/<task>/, sharing one body file")
    p.add_argument("--out", type=Path, required=True, help="the dir to write (with --all: the parent of each)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dir")

    p = sub.add_parser("store", help="the checkpoint store beside the outputs: `supermerge store prune CONFIG`")
    p.add_argument("action", choices=["prune"])
    p.add_argument("config", type=Path, help="the YAML config whose outputs' store to prune")
    p.add_argument("--all", action="store_true", help="remove every entry (outputs keep their own hard links)")
    p.add_argument("--output", type=Path, help="the config's output dir (a mergekit config needs it)")

    p = sub.add_parser("convert", help="print supermerge's config for a mergekit config")
    p.add_argument("config", type=Path, help="a mergekit YAML config")
    p.add_argument("--output", type=Path, help="the output dir (mergekit gives it on the command line)")

    sub.add_parser("methods", help="list merge methods, their papers, defaults and search grids")

    sub.add_parser("register", help="check a new task model and add it to a registry; emits the Prefect event "
                   "that re-merges (`supermerge register --help`)", add_help=False)
    sub.add_parser("unregister", help="take a task model off a registry (`supermerge unregister --help`)",
                   add_help=False)

    p = sub.add_parser("demo", help="fine-tune the packaged MiniLM on four real tasks, merge them as a Prefect flow")
    p.add_argument("--workdir", type=Path, default=Path("supermerge-demo"),
                   help="where data, fine-tuned models and merges are cached (default ./supermerge-demo)")
    p.add_argument("--steps", type=int, default=40, help="SuperMerge training steps")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["register"]:
        from supermerge.flows.registry import register_command  # its own flags (flows/registry.py)

        return register_command(argv[1:])
    if argv[:1] == ["unregister"]:
        from supermerge.flows.registry import unregister_command

        return unregister_command(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "merge":
            return cmd_merge(args.config, options_from_args(args), prefect=args.prefect)
        if args.command == "plan":
            return cmd_plan(args.config, options_from_args(args))
        if args.command == "evaluate":
            return cmd_evaluate(args.config, args.models, device=args.device, references=not args.no_references)
        if args.command == "methods":
            return cmd_methods()
        if args.command == "export":
            return cmd_export(args.merged, task=args.task, every=args.all, out=args.out, overwrite=args.overwrite)
        if args.command == "store":
            return cmd_store_prune(args.config, everything=args.all, output=args.output)
        if args.command == "convert":
            return cmd_convert(args.config, output=args.output)
        return cmd_demo(args.workdir, steps=args.steps)
    except SupermergeError as e:
        print(f"supermerge: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"supermerge: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


INTERRUPTED = ("supermerge: interrupted; nothing was published (merge nodes finished before the interrupt stay "
               "in the store and are reused by the next run)")


if __name__ == "__main__":
    sys.exit(main())

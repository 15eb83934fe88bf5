"""``supermerge``: merge fine-tuned copies of one pretrained model into one multi-task model.

The CLI sits at the top of the import graph (flows -> orchestrator -> merge_core) so one entry point
serves planning, merges (a flat merge is a tree of one node) and evaluation. Each subcommand is a typed
function; argparse only maps flags onto it. Errors supermerge raises on purpose print as one line (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from merge_core.errors import CheckpointError, SupermergeError

log = logging.getLogger("supermerge")

EXAMPLE_CONFIG = """\
example config (paths relative to the config file):

  base: models/base                 # HF model dir or .safetensors of the pretrained model
  output: merged/supermerge         # written atomically; refused if it exists (use --overwrite)
  method: supermerge                # see `supermerge methods`
  parameters: {steps: 100, lr: 0.05}  # a list value is searched on the validation data
  models:
    - name: sentiment
      path: models/sentiment        # full fine-tune dir, .safetensors, or a PEFT LoRA/IA3 adapter dir
      validation: data/sentiment.val.jsonl   # {"text": ..., "label": ...} per line; 32 a task suffices
      test: data/sentiment.test.jsonl
    - name: language
      path: models/language
      validation: data/language.val.jsonl
  tree: {max_fan_in: 4, memory_budget: 8GB}  # optional; `supermerge plan` shows the tree and its memory
"""


def _load_merge_config(
    config_path: Path,
    *,
    output: Path | None = None,
    method: str | None = None,
    device: str | None = None,
    memory_budget: str | None = None,
    max_fan_in: int | None = None,
    flat: bool = False,
):
    """The config with the command line's overrides, validated again as a whole (one ConfigError)."""
    from merge_core.config import load_config, parse_config

    overrides = {"output": str(output.resolve()) if output else None, "device": device}
    config = load_config(config_path, overrides)
    raw = config.resolved()
    if method is not None and method != config.method:
        # the config's parameters belong to its own method: another method starts from its defaults
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
    return parse_config(raw, source=f"{config_path} (with the command line's options)")


def cmd_plan(config_path: Path, *, device: str | None, memory_budget: str | None, max_fan_in: int | None,
             flat: bool) -> int:
    """Print the merge tree, each node's predicted peak memory and device, and the fan-in chosen."""
    from orchestrator.plan import plan

    config = _load_merge_config(config_path, device=device, memory_budget=memory_budget,
                                max_fan_in=max_fan_in, flat=flat)
    print(plan(config, progress=True).render())
    return 0


def cmd_merge(
    config_path: Path, *, output: Path | None, method: str | None, device: str | None, overwrite: bool,
    memory_budget: str | None = None, max_fan_in: int | None = None, flat: bool = False, prefect: bool = False,
) -> int:
    """Plan the merge tree (refusing before any work if it cannot fit), run it bottom-up through the
    checkpoint store, and print where the result is and how well it scores. ``prefect``: run it as the
    ``hierarchical-merge`` flow (Prefect's embedded default, or the server at PREFECT_API_URL)."""
    if prefect:
        return _merge_with_prefect(config_path, output=output, method=method, device=device, overwrite=overwrite,
                                   memory_budget=memory_budget, max_fan_in=max_fan_in, flat=flat)
    from orchestrator.executor import REPORT_FILE, execute
    from orchestrator.memory import format_bytes
    from orchestrator.plan import plan

    config = _load_merge_config(config_path, output=output, method=method, device=device,
                                memory_budget=memory_budget, max_fan_in=max_fan_in, flat=flat)
    check_output(config.output, overwrite=overwrite)
    merge_plan = plan(config, progress=True)
    created = _missing_folders(config.output.parent)
    try:
        report = execute(merge_plan, overwrite=overwrite, progress=True)
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
    return 0


def check_output(output: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, an output that cannot be written (``output_problem``) or that is the
    checkpoint store beside it, or inside it (the store would be replaced by the merged model)."""
    from merge_core.checkpoint import output_problem
    from orchestrator.executor import STORE_DIR

    problem = output_problem(output, overwrite=overwrite)
    if problem is None and STORE_DIR in output.parts:
        problem = (f"{output} is the checkpoint store beside it ({STORE_DIR}) or inside one, which holds the merge's intermediate "
                   "models; choose an output outside it")
    if problem is not None:
        raise CheckpointError(problem)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and the folders above it that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def os_error_line(e: OSError) -> str:
    """An OSError as one line naming the path and what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    advice = {
        errno.ENOSPC: "free space there, or choose an output on another filesystem",
        errno.EFBIG: "the file is larger than this filesystem or a limit on this process allows",
        errno.EROFS: "the filesystem is read-only: choose another output",
        errno.EACCES: "permission denied: choose a path this user may write, or fix its permissions",
        errno.EPERM: "not permitted: choose a path this user may write",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.ELOOP: "a symbolic link on the path leads back to itself",
        errno.EEXIST: "something is already there",
    }.get(e.errno or 0, "check the path and the filesystem")
    return f"{where or 'a file'}: {e.strerror or e} ({advice})"


def _merge_with_prefect(config_path: Path, *, output: Path | None, **options) -> int:
    from flows.local import run_flow

    shown = {k: options[k] for k in ("method", "device", "memory_budget", "max_fan_in", "flat")}
    check_output(_load_merge_config(config_path, output=output, **shown).output, overwrite=options["overwrite"])

    result = run_flow(config_path, output=str(output.resolve()) if output else None, evaluate=True, **options)
    print(f"merged with the hierarchical-merge flow in {result['seconds']:.1f} s -> {result['output']}")
    print(f"tree: {len(result['nodes'])} merge(s): {result['merged']} merged, {result['from_store']} from the store; "
          f"slots {result['slots']}; per node: {Path(result['output']) / 'merge_report.json'}")
    if result["test_accuracy"]:
        print("test accuracy:       " + _fmt(result["test_accuracy"]))
    return 0


def cmd_evaluate(config_path: Path, models: Sequence[Path], *, device: str | None, references: bool) -> int:
    """Score merged models on every task's test data and print the paper's table."""
    from merge_core.config import load_config
    from merge_core.evaluate import results_table
    from merge_core.job import score_models

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
    """List the merge methods with their papers and default hyperparameter grids."""
    from merge_core.methods.registry import METHODS

    for spec in METHODS.values():
        grid = ", ".join(f"{k}={list(v)}" for k, v in spec.grid.items())
        print(f"{spec.name:20s} {spec.summary}\n{'':20s} {spec.paper}" + (f"\n{'':20s} grid: {grid}" if grid else ""))
    return 0


def cmd_demo(workdir: Path, *, steps: int) -> int:
    """Real end-to-end run: the packaged MiniLM fine-tuned briefly on four real tasks, merged as a tree by
    the Prefect flow hierarchical-merge (embedded server), with flat baselines beside it."""
    from bench.demo import run_demo

    print(run_demo(workdir, steps=steps, progress=True))
    return 0


def _fmt(acc: dict[str, float]) -> str:
    return ", ".join(f"{t} {100 * a:.1f}%" for t, a in sorted(acc.items()))


def _tree_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="memory one merge node may use, e.g. 8GB or 512MiB (default: a safe share of what is free)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--max-fan-in", type=int, metavar="N",
                       help="at most N models per merge node (the planner takes the largest that fits)")
    shape.add_argument("--flat", action="store_true", help="one merge of every model (no tree)")


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

    p = sub.add_parser("merge", help="merge the models a YAML config names", epilog=EXAMPLE_CONFIG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="YAML config (base, models, method, parameters, output)")
    p.add_argument("--output", type=Path, help="override the config's output dir")
    p.add_argument("--method", help="override the config's method (see `supermerge methods`)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    p.add_argument("--prefect", action="store_true",
                   help="run as the Prefect flow hierarchical-merge (embedded server unless PREFECT_API_URL is set)")
    _tree_options(p)

    p = sub.add_parser("plan", help="show the merge tree, each node's predicted memory and device, the fan-in")
    p.add_argument("config", type=Path, help="YAML config (base, models, method, parameters, tree)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    _tree_options(p)

    p = sub.add_parser("evaluate", help="score merged models on each task's test data (the paper's table)")
    p.add_argument("config", type=Path, help="the YAML config the models were merged with")
    p.add_argument("models", type=Path, nargs="*", help="merged model dirs (default: the config's output)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-references", action="store_true",
                   help="skip the pretrained and individual fine-tuned reference rows")

    sub.add_parser("methods", help="list merge methods, their papers and default grids")

    sub.add_parser("bench", help="the multi-task benchmark (docs/benchmarks.md); `supermerge bench --help`",
                   add_help=False)
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
    if argv[:1] == ["bench"]:
        from bench.benchmark import main as bench_main  # its own flags, passed through untouched

        return bench_main(argv[1:])
    if argv[:1] == ["register"]:
        from flows.registry import register_command  # its own flags (flows/registry.py)

        return register_command(argv[1:])
    if argv[:1] == ["unregister"]:
        from flows.registry import unregister_command

        return unregister_command(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "merge":
            return cmd_merge(args.config, output=args.output, method=args.method, device=args.device,
                             overwrite=args.overwrite, memory_budget=args.memory_budget,
                             max_fan_in=args.max_fan_in, flat=args.flat, prefect=args.prefect)
        if args.command == "plan":
            return cmd_plan(args.config, device=args.device, memory_budget=args.memory_budget,
                            max_fan_in=args.max_fan_in, flat=args.flat)
        if args.command == "evaluate":
            return cmd_evaluate(args.config, args.models, device=args.device, references=not args.no_references)
        if args.command == "methods":
            return cmd_methods()
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

"""Memory benchmark of the orchestrator: predicted vs measured peak per merge node, flat vs fan-in 2
vs flat over compressed task vectors.

For each k (default 4, 8, 16) the packaged MiniLM is merged four times, each run in a fresh Python
process so nothing one run freed hides the next one's growth: with SuperMerge flat (one node of k
inputs), as a balanced tree of fan-in 2 (depth ceil(log2 k)), and flat over compressed task vectors
(``basis: compressed``: each matrix kept as its top floor(min(m, n) / k) singular components, unless
``--rank``; supermerge.merge_core.compress), and with TIES (fixed density and lam) flat, which streams tensor by
tensor (supermerge.merge_core.stream). Every node runs through the executor's ``run_node``, which measures
its peak as RSS growth over the node (the kernel's high-water mark, reset at the node's start; see
orchestrator/measure.py). The run's whole-process peak (``ru_maxrss``) is reported too.

The task models are synthetic fine-tunes: the base plus small seeded noise (pairs share a noise
component, so the clustered tree has real structure), each with its own classification head and 32
random labelled validation examples of 32 tokens. They cost exactly what real fine-tunes of the same
model cost in memory, and take seconds instead of minutes to make; their accuracy means nothing, so
it is not reported here.

    python -m bench.memory_bench --workdir /tmp/memory-bench --json memory.json --markdown docs/perf/memory.md

prints one table per node (predicted, measured, measured / predicted), one per k (the largest node's
measured peak per mode, fan-in 2 / flat and flat-compressed / fan-in 2, the range of measured /
predicted per mode) and one of whole-process peaks and seconds. SuperMerge runs one step by default: the peak comes in the first step's
backward pass; later steps add a few percent (848 -> 880 MiB over 6 steps for a 2-input node), which
``--steps`` shows. Torch runs on one thread (``--threads``): on a small shared machine more threads
only spin, and the memory is the same.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

MODES = ("flat", "fanin2", "compressed", "stream")
"""SuperMerge flat, as a fan-in-2 tree and flat over compressed task vectors; TIES with fixed
parameters, streamed tensor by tensor."""

STREAMED_TIES = {"density": 0.2, "lam": 1.0}

TABLES_MARKER = "<!-- tables below: written by bench/memory_bench.py -->"
"""``--markdown`` keeps what the file holds up to this line (the doc's prose) and rewrites the rest."""

NOISE = 1e-3
"""Standard deviation of each synthetic fine-tune's weight noise (a pair shares half of it)."""


def make_synthetic_models(workdir: Path, k: int, *, n_val: int = 32, seq_len: int = 32) -> list[dict[str, str]]:
    """``k`` synthetic fine-tunes of the packaged MiniLM (``task00``...), made once and reused."""
    from supermerge.merge_core.workload import minilm_dir
    from supermerge.merge_core.checkpoint import open_checkpoint
    from supermerge.merge_core.data import TaskData, save_task_data

    base = minilm_dir()
    config = json.loads((base / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], num_labels=2)
    entries = []
    with open_checkpoint(base) as ckpt:
        for i in range(k):
            name = f"task{i:02d}"
            folder = workdir / "models" / name
            val = workdir / "data" / f"{name}.val.safetensors"
            if not (folder / "model.safetensors").is_file():
                family = torch.Generator().manual_seed(1000 + i // 2)
                own = torch.Generator().manual_seed(2000 + i)
                tensors = {}
                for n in ckpt.keys():
                    t = ckpt.get(n)
                    if t.is_floating_point():
                        shared = torch.randn(t.shape, generator=family)
                        t = t + NOISE * (shared + torch.randn(t.shape, generator=own)) / 2**0.5
                    tensors[f"bert.{n}"] = t.contiguous()
                tensors["classifier.weight"] = 0.02 * torch.randn(2, config["hidden_size"], generator=own)
                tensors["classifier.bias"] = torch.zeros(2)
                tmp = folder.with_name(f".{name}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                (tmp / "config.json").write_text(json.dumps(config, indent=2))
                tmp.rename(folder)
            if not val.is_file():
                val.parent.mkdir(parents=True, exist_ok=True)
                g = torch.Generator().manual_seed(3000 + i)
                ids = torch.randint(1000, config["vocab_size"], (n_val, seq_len), generator=g)
                ids[:, 0], ids[:, -1] = 101, 102
                labels = torch.randint(0, 2, (n_val,), generator=g)
                save_task_data(TaskData({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels), val)
            entries.append({"name": name, "path": str(folder), "validation": str(val)})
    return entries


def run_case(workdir: Path, k: int, mode: str, steps: int, threads: int, rank: int | None = None) -> dict[str, Any]:
    """One merge of the first k models in ``mode`` (see MODES), in this process; its nodes' records.
    ``rank``: singular components kept per task in the compressed mode (None: TSV-M's floor)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    from supermerge.merge_core.workload import minilm_dir
    from supermerge.merge_core.config import parse_config
    from supermerge.orchestrator.executor import execute
    from supermerge.orchestrator.plan import plan

    torch.set_num_threads(threads)
    models = make_synthetic_models(workdir, k)
    case = workdir / "runs" / f"k{k}-{mode}"
    shutil.rmtree(case, ignore_errors=True)
    tree = {"max_fan_in": 2} if mode == "fanin2" else {"flat": True}
    method, params = ("ties", STREAMED_TIES) if mode == "stream" else ("supermerge", {"steps": steps})
    if mode == "compressed":
        params = {**params, "basis": "compressed", **({"rank": rank} if rank is not None else {})}
    config = parse_config({
        "base": str(minilm_dir()), "output": str(case / "merged"), "method": method,
        "parameters": params, "models": models, "device": "cpu", "tree": tree,
    })
    started = time.perf_counter()
    merge_plan = plan(config)
    report = execute(merge_plan, store_dir=case / "store")
    nodes = {n.id: n for n in merge_plan.nodes}
    return {
        "k": k,
        "mode": mode,
        "fan_in": merge_plan.fan_in,
        "depth": merge_plan.tree.depth,
        "shape": merge_plan.shape,
        "seconds": round(time.perf_counter() - started, 1),
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "nodes": [
            {
                "node": r.id, "inputs": len(nodes[r.id].children), "tasks": len(nodes[r.id].tasks),
                "predicted_bytes": r.predicted_peak_bytes, "measured_bytes": r.measured_peak_bytes,
                "ratio": r.measured_peak_bytes / r.predicted_peak_bytes, "method": r.peak_method,
                "predicted_terms": nodes[r.id].to_dict()["predicted"],
            }
            for r in report.nodes
        ],
    }


def _in_subprocess(workdir: Path, k: int, mode: str, steps: int, threads: int, rank: int | None) -> dict[str, Any]:
    out = workdir / "runs" / f"k{k}-{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bench.memory_bench", "--workdir", str(workdir), "--case", str(k), mode,
           "--steps", str(steps), "--threads", str(threads), "--case-out", str(out)]
    if rank is not None:
        cmd += ["--rank", str(rank)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


MODE_NAMES = {"flat": "flat", "fanin2": "fan-in 2", "compressed": "flat-compressed", "stream": "streamed TIES"}


def _ratio_range(case: dict[str, Any] | None) -> str:
    if case is None:
        return "-"
    ratios = [n["ratio"] for n in case["nodes"]]
    lo, hi = min(ratios), max(ratios)
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"


def _peak(case: dict[str, Any] | None) -> int | None:
    return None if case is None else max(n["measured_bytes"] for n in case["nodes"])


def tables(cases: list[dict[str, Any]]) -> str:
    """Markdown: per-node measured vs predicted; per k, each mode's largest node and the ratios
    between them; per k, whole-process peaks and seconds."""
    lines = ["| k | mode | node | inputs | tasks | paper's eq. 6 MiB | predicted MiB | measured MiB "
             "| measured / predicted | measured / eq. 6 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        for n in c["nodes"]:
            eq6 = n["predicted_terms"]["eq6"]
            versus_eq6 = f"{n['measured_bytes'] / eq6:.2f}" if eq6 else "-"
            lines.append(f"| {c['k']} | {MODE_NAMES[c['mode']]} | {n['node']} | {n['inputs']} | {n['tasks']} | "
                         f"{_mb(eq6) if eq6 else '-'} | {_mb(n['predicted_bytes'])} | {_mb(n['measured_bytes'])} | "
                         f"{n['ratio']:.2f} | {versus_eq6} |")
    ratios = [n["ratio"] for c in cases for n in c["nodes"]]
    lines += ["", f"measured / predicted over {len(ratios)} nodes: min {min(ratios):.2f}, max {max(ratios):.2f}", ""]
    by = {(c["k"], c["mode"]): c for c in cases}
    ks = sorted({c["k"] for c in cases})
    lines += ["| k | flat: node MiB | fan-in 2: largest node MiB (depth) | flat-compressed: node MiB "
              "| fan-in 2 / flat | flat-compressed / fan-in 2 | streamed TIES: node MiB "
              "| measured / predicted: flat | fan-in 2 | flat-compressed | streamed TIES |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in ks:
        flat, tree, comp, stream = (by.get((k, m)) for m in MODES)
        fp, tp, cp, sp = (_peak(c) for c in (flat, tree, comp, stream))
        depth = f" ({tree['depth']})" if tree is not None and "depth" in tree else ""
        cells = [
            _mb(fp) if fp else "-", f"{_mb(tp)}{depth}" if tp else "-", _mb(cp) if cp else "-",
            f"{tp / fp:.2f}" if tp and fp else "-", f"{cp / tp:.2f}" if cp and tp else "-",
            _mb(sp) if sp else "-", *(_ratio_range(c) for c in (flat, tree, comp, stream)),
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "| k | process peak RSS MiB: flat / fan-in 2 / flat-compressed / streamed TIES "
              "| seconds: flat / fan-in 2 / flat-compressed / streamed TIES |", "|---|---|---|"]
    for k in ks:
        got = [by.get((k, m)) for m in MODES]
        rss = " / ".join(_mb(c["process_peak_rss_bytes"]) if c else "-" for c in got)
        secs = " / ".join(f"{c['seconds']:.0f}" if c else "-" for c in got)
        lines.append(f"| {k} | {rss} | {secs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "supermerge-memory-bench",
                        help="where the synthetic models (about 90 MB each) and the runs go; reused")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=1, help="SuperMerge steps per node")
    parser.add_argument("--rank", type=int, help="compressed mode: singular components kept per task and "
                                                 "matrix (default: TSV-M's floor(min(m, n) / k))")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a small shared machine more threads only spin)")
    parser.add_argument("--json", type=Path, help="write every case's records here")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--case", nargs=2, metavar=("K", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--case-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        result = run_case(args.workdir, int(args.case[0]), args.case[1], args.steps, args.threads, args.rank)
        args.case_out.write_text(json.dumps(result, indent=2))
        return 0
    make_synthetic_models(args.workdir, max(args.ks))
    cases = [_in_subprocess(args.workdir, k, mode, args.steps, args.threads, args.rank)
             for k in args.ks for mode in args.modes]
    text = tables(cases)
    command = "python -m bench.memory_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(text)
    print(f"\n(command: {command})")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "cases": cases}, indent=2))
    if args.markdown:
        old = args.markdown.read_text() if args.markdown.is_file() else ""
        prose = old[:old.index(TABLES_MARKER) + len(TABLES_MARKER)] + "\n\n" if TABLES_MARKER in old else ""
        args.markdown.write_text(f"{prose}{text}\n\nCommand: `{command}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

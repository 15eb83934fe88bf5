"""The moonshot (issue 15 part 4): k = 32 task models of a 0.5B-parameter decoder, planned and merged on
a machine that cannot hold their task vectors.

The base is a randomly initialised decoder with Qwen2-0.5B's config (``QWEN2_0_5B``: hidden 896, 24
layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151,936, tied embeddings; 494 M values),
built with ``transformers.Qwen2Config``, seeded. Each of the k task models is the base plus a seeded
task vector: a rank-``--delta-rank`` product per matrix plus small noise (per tensor for the rest),
written in bf16 safetensors (about 1 GB each). Their validation data is synthetic token sequences
(a language-modelling task: the loss is next-token cross-entropy through the merged model's own
output layer). This measures memory and time, not accuracy.

In fp32 the k task vectors alone hold k x 1.98 GB (63 GB at k = 32). The run gives the planner a
memory budget (``--memory-budget``), runs ``supermerge plan`` (printed) and ``supermerge merge``
with a few SuperMerge steps per node, and reads from every node's record its predicted and measured
peak (RSS growth over the node, orchestrator/measure.py) and its seconds per training step.

    python -m bench.moonshot --workdir /tmp/moonshot --markdown docs/perf/moonshot.md
    python -m bench.moonshot --small --workdir /tmp/moonshot-small     # a shrunken decoder, seconds

The workdir holds the models (``--keep`` keeps them; by default they are deleted at the end) and the
checkpoint store: a re-run resumes, finished nodes read back from the store (``--fresh`` empties it).
The machine's load is sampled during the merge (its 1-minute load average every ``LOAD_SAMPLE_SECONDS``):
other work on the machine inflates the seconds, not the memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

QWEN2_0_5B: dict[str, Any] = dict(
    hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
)
"""Qwen2-0.5B's config.json numbers (Hugging Face Qwen/Qwen2-0.5B)."""

SMALL: dict[str, Any] = dict(
    QWEN2_0_5B, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=704, vocab_size=32000, max_position_embeddings=256,
)
"""The same architecture shrunk (its word embedding still the largest tensor by far, as in Qwen2)."""


@dataclass(frozen=True)
class Setup:
    """What the run builds and how it merges."""

    config: dict[str, Any]
    k: int
    delta_rank: int = 8
    noise: float = 2e-4
    """Standard deviation of each task vector's noise (its low-rank part has 10x this)."""
    n_val: int = 8
    seq_len: int = 32
    steps: int = 2
    batch_size: int = 2
    memory_budget: str = "11GiB"
    seed: int = 0


def make_base(folder: Path, config: dict[str, Any], seed: int) -> Path:
    """A randomly initialised Qwen2 causal LM, saved in bf16 (made once)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**config, torch_dtype="bfloat16"))
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    del model
    tmp.rename(folder)
    return folder


def make_task_models(workdir: Path, base: Path, setup: Setup) -> list[dict[str, str]]:
    """``setup.k`` task models (``task00``...): the base plus a rank-``delta_rank`` product per matrix
    plus noise, in bf16, with ``n_val`` token sequences of validation data each; made once, reused.

    The noise of every task comes from one seeded pool, each task and tensor reading it from its own
    seeded offset: drawing 494 M normal values per task would take minutes a task on this machine."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from supermerge.merge_core.data import TaskData, save_task_data

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        largest = max(_numel(f.get_slice(n).get_shape()) for n in names)
    pool: torch.Tensor | None = None
    entries = []
    for i in range(setup.k):
        name = f"task{i:02d}"
        folder = workdir / "models" / name
        val = workdir / "data" / f"{name}.val.safetensors"
        if not (folder / "model.safetensors").is_file():
            if pool is None:
                pool = torch.randn(2 * largest, generator=torch.Generator().manual_seed(setup.seed + 7))
            g = torch.Generator().manual_seed(setup.seed + 1000 + i)
            tensors = {}
            with safe_open(str(base / "model.safetensors"), "pt") as f:
                for n in names:
                    b = f.get_tensor(n)
                    start = int(torch.randint(0, largest, (1,), generator=g))
                    delta = setup.noise * pool[start:start + b.numel()].view(b.shape)
                    if b.dim() == 2:
                        r = setup.delta_rank
                        scale = 10 * setup.noise / r ** 0.5
                        delta = delta + scale * (torch.randn(b.shape[0], r, generator=g)
                                                 @ torch.randn(r, b.shape[1], generator=g))
                    tensors[n] = (b.to(torch.float32) + delta).to(b.dtype)
                    del delta
            tmp = folder.with_name(f".{name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            del tensors
            shutil.copy(base / "config.json", tmp / "config.json")
            tmp.rename(folder)
        if not val.is_file():
            val.parent.mkdir(parents=True, exist_ok=True)
            g = torch.Generator().manual_seed(setup.seed + 3000 + i)
            ids = torch.randint(0, setup.config["vocab_size"], (setup.n_val, setup.seq_len), generator=g)
            save_task_data(TaskData({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone()), val)
        entries.append({"name": name, "path": str(folder), "validation": str(val)})
    return entries


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_config(workdir: Path, base: Path, models: list[dict[str, str]], setup: Setup) -> Path:
    """The ``supermerge merge`` config: SuperMerge, ``steps`` steps of ``batch_size`` sequences a task,
    causal LM, the planner free to choose the plan under ``memory_budget``."""
    import yaml

    config = {
        "base": str(base), "output": str(workdir / "merged"), "method": "supermerge", "kind": "causal_lm",
        "parameters": {"steps": setup.steps, "batch_size": setup.batch_size}, "max_length": setup.seq_len,
        "device": "cpu", "seed": setup.seed, "models": models, "store": str(workdir / "store"),
        "tree": {"memory_budget": setup.memory_budget},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


LOAD_SAMPLE_SECONDS = 30.0


class LoadSampler(threading.Thread):
    """The 1-minute load average every LOAD_SAMPLE_SECONDS while a block runs (the machine is shared)."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="load-sampler")
        self.samples: list[float] = [os.getloadavg()[0]]
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(LOAD_SAMPLE_SECONDS):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        self.samples.append(os.getloadavg()[0])
        return {"mean": sum(self.samples) / len(self.samples), "max": max(self.samples),
                "samples": len(self.samples)}


def _cli(*args: str, log: Path) -> str:
    """Run ``supermerge ARGS`` in a fresh process (as a user would), its output kept in ``log``."""
    cmd = [sys.executable, "-m", "supermerge.flows.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS":
                                                                      os.environ.get("OMP_NUM_THREADS", "2")})
    log.write_text(f"$ supermerge {' '.join(args)}\n{done.stdout}\n{done.stderr}")
    if done.returncode:
        raise RuntimeError(f"supermerge {args[0]} failed ({done.returncode}); see {log}:\n{done.stderr[-3000:]}")
    return done.stdout


def node_rows(store: Path, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per node of the merge report: predicted and measured peak, their ratio, seconds, seconds per step."""
    rows = []
    for n in report["nodes"]:
        record = json.loads((Path(n["path"]) / "supermerge.json").read_text())
        steps = record.get("merge_weights", {}).get("step_seconds", [])
        rows.append({
            "node": n["id"], "inputs": len(record.get("models", {})), "predicted_bytes": n["predicted_peak_bytes"],
            "measured_bytes": n["measured_peak_bytes"], "ratio": n["measured_peak_bytes"] / n["predicted_peak_bytes"],
            "seconds": n["seconds"], "step_seconds": steps, "predicted_terms": record.get("predicted", {}),
            "peak_method": n["peak_method"], "cached": record.get("node", {}).get("cached", False),
        })
    return rows


def run(workdir: Path, setup: Setup, fresh: bool = False) -> dict[str, Any]:
    """Build everything, plan, merge; the plan's text and every node's numbers. The store is kept
    between runs (finished nodes are resumed) unless ``fresh``."""
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = make_base(workdir / "base", setup.config, setup.seed)
    models = make_task_models(workdir, base, setup)
    made = time.perf_counter() - started
    config = write_config(workdir, base, models, setup)
    shutil.rmtree(workdir / "merged", ignore_errors=True)
    if fresh:
        shutil.rmtree(workdir / "store", ignore_errors=True)
    plan_text = _cli("plan", str(config), log=workdir / "plan.log")
    load_before = os.getloadavg()
    load = LoadSampler()
    load.start()
    merge_started = time.perf_counter()
    try:
        _cli("merge", str(config), log=workdir / "merge.log")
    finally:
        load_during = load.stop()
    merge_seconds = time.perf_counter() - merge_started
    report = json.loads((workdir / "merged" / "merge_report.json").read_text())
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        n_params = sum(_numel(f.get_slice(n).get_shape()) for n in f.keys())
    return {
        "k": setup.k, "n_params": n_params, "setup": {**setup.__dict__, "config": setup.config},
        "plan": plan_text, "shape": report.get("plan", {}).get("shape"), "nodes": node_rows(workdir / "store", report),
        "seconds_to_make_models": round(made, 1), "merge_seconds": round(merge_seconds, 1),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "load_during": load_during,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, torch "
                   f"{torch.__version__}, {torch.get_num_threads()} threads",
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f}"


def table(result: dict[str, Any]) -> str:
    """Markdown: per node predicted, measured, ratio, seconds per step; the predicted terms of the largest."""
    lines = ["| node | inputs | predicted GiB | measured GiB | measured / predicted | node seconds "
             "| seconds per step |", "|---|---|---|---|---|---|---|"]
    for n in result["nodes"]:
        per_step = ", ".join(f"{s:.0f}" for s in n["step_seconds"]) or "-"
        lines.append(f"| {n['node']}{' (resumed from the store)' if n.get('cached') else ''} | {n['inputs']} | {_gib(n['predicted_bytes'])} | {_gib(n['measured_bytes'])} "
                     f"| {n['ratio']:.2f} | {n['seconds']:.0f} | {per_step} |")
    top = max(result["nodes"], key=lambda n: n["predicted_bytes"])
    terms = {k: v for k, v in top["predicted_terms"].items()
             if isinstance(v, int) and v and k not in ("eq6", "total", "device", "host", "peak")}
    lines += ["", f"Predicted terms of {top['node']} (GiB): "
              + ", ".join(f"`{k}` {_gib(v)}" for k, v in sorted(terms.items(), key=lambda kv: -kv[1]))]
    return "\n".join(lines)


TABLES_MARKER = "<!-- below: written by bench/moonshot.py -->"


def markdown(result: dict[str, Any], command: str) -> str:
    la, lb, ld = result["load_average_before"], result["load_average_after"], result["load_during"]
    ratios = [n["ratio"] for n in result["nodes"]]
    outside = [n["node"] for n in result["nodes"] if not 0.8 <= n["ratio"] <= 1.1]
    return (f"{table(result)}\n\nk = {result['k']} task models of {result['n_params']:,} values "
            f"(fp32 task vectors: {_gib(4 * result['k'] * result['n_params'])} GiB); plan: {result['shape']}, "
            f"{len(result['nodes'])} node(s); measured / predicted {min(ratios):.2f}-{max(ratios):.2f}"
            f"{' (outside 0.8-1.1: ' + ', '.join(outside) + ')' if outside else ', every node within 0.8-1.1'}; "
            f"`supermerge merge` took {result['merge_seconds']:.0f} s (making the models in this run "
            f"{result['seconds_to_make_models']:.0f} s; 0 when the workdir had them). Machine: {result['machine']}; "
            f"1-minute load average {la[0]:.1f} before the merge, {lb[0]:.1f} after, {ld['mean']:.1f} on average "
            f"(max {ld['max']:.1f}) over {ld['samples']} samples during it: the machine was shared, so the seconds "
            f"are inflated by about load / CPUs where that is above 1.\n\n"
            f"`supermerge plan` printed:\n\n```\n{result['plan'].rstrip()}\n```\n\nCommand: `{command}`\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moonshot"))
    parser.add_argument("--small", action="store_true", help="a shrunken decoder (seconds, not minutes)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="SuperMerge steps per node")
    parser.add_argument("--memory-budget", help="the plan's budget (default 11GiB; --small: 800MiB, since the "
                        "process itself holds some 440 MB before any node)")
    parser.add_argument("--keep", action="store_true", help="keep the models in the workdir")
    parser.add_argument("--fresh", action="store_true", help="empty the checkpoint store first (no resume)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, help="rewrite this file below its marker line")
    args = parser.parse_args(argv)
    setup = Setup(SMALL if args.small else QWEN2_0_5B, args.k, steps=args.steps,
                  memory_budget=args.memory_budget or ("800MiB" if args.small else "11GiB"))
    try:
        result = run(args.workdir, setup, fresh=args.fresh)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir / "models", ignore_errors=True)
    command = "python -m bench.moonshot " + " ".join(sys.argv[1:] if argv is None else argv)
    print(result["plan"])
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps({"command": command, **result}, indent=2))
    if args.markdown:
        old = args.markdown.read_text() if args.markdown.is_file() else ""
        prose = old[:old.index(TABLES_MARKER) + len(TABLES_MARKER)] + "\n\n" if TABLES_MARKER in old else ""
        args.markdown.write_text(prose + markdown(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

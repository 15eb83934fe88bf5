"""Ours against FusionBench's own functions: TSV-M, Iso-C, Iso-CTS and WUDI on random task vectors.

FusionBench (``fusion-bench==0.2.33``) lives in its own venv and is never a dependency:

    python -m venv /work/venvs/fusionbench && /work/venvs/fusionbench/bin/pip install torch==2.13.0 \\
        && /work/venvs/fusionbench/bin/pip install fusion-bench==0.2.33
    python -m bench.fusionbench_bench --python /work/venvs/fusionbench/bin/python --out docs/perf/fusionbench.md

This process draws seeded random task vectors (task-vector-sized entries, ~1e-3) for a few tensors
(square, tall, wide, an embedding-like tall matrix, a bias), writes them to a file, and runs this
module with ``--worker`` under the venv's python, which calls FusionBench's lowest-level functions
(``TSVM_utils.compute_and_sum_svd_mem_reduction``, ``iso_utils.iso_c`` / ``iso_cts``,
``wudi.wudi_merging``) on state dicts of those tensors; then compares their outputs with our
operators at alpha = 1 (their default) and writes the max abs difference per method. For WUDI it
compares their Adam with ours (``solver: adam``), and reports the objective that their Adam and our
closed form reach.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {"square": (96, 96), "tall": (160, 48), "wide": (48, 160), "embedding": (600, 32), "bias": (96,)}
K = 4


def _worker(path: Path, out: Path) -> None:
    """Runs under FusionBench's venv: their functions on our tensors."""
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    from fusion_bench.method.wudi.wudi import wudi_merging

    stacks = torch.load(path, weights_only=True)
    task_vectors = [{n: s[i].clone() for n, s in stacks.items()} for i in range(K)]
    results, seconds = {}, {}
    for name, fn in [
        ("tsv", lambda tv: compute_and_sum_svd_mem_reduction(tv, accelerator="cpu")),
        ("iso_c", lambda tv: iso_c(tv, accelerator="cpu")),
        ("iso_cts", lambda tv: iso_cts(tv, common_space_fraction=0.8, accelerator="cpu")),
        ("wudi", lambda tv: wudi_merging(tv, accelerator="cpu", iter_num=300)),
    ]:
        started = time.perf_counter()
        merged = fn([{n: t.clone() for n, t in tv.items()} for tv in task_vectors])
        seconds[name] = time.perf_counter() - started
        results[name] = {n: t.detach().clone() for n, t in merged.items()}
    torch.save({"results": results, "seconds": seconds}, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="/work/venvs/fusionbench/bin/python", help="the venv with fusion-bench")
    parser.add_argument("--out", type=Path, default=Path("docs/perf/fusionbench.md"))
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(*args.worker)
        return

    from supermerge.merge_core.methods import iso, tsv, wudi

    g = torch.Generator().manual_seed(0)
    stacks = {n: 1e-3 * torch.randn(K, *shape, generator=g) for n, shape in SHAPES.items()}
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save(stacks, inputs)
        version = subprocess.run([args.python, "-c", "import importlib.metadata as m; print(m.version('fusion-bench'))"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run([args.python, "-m", "bench.fusionbench_bench", "--worker", str(inputs), str(outputs)],
                       check=True)
        theirs = torch.load(outputs, weights_only=True)
    ours_ops = {
        "tsv": lambda d: tsv.merge(torch.zeros(d.shape[1:]), d),
        "iso_c": lambda d: iso.merge_iso_c(torch.zeros(d.shape[1:]), d),
        "iso_cts": lambda d: iso.merge_iso_cts(torch.zeros(d.shape[1:]), d, common_space_fraction=0.8),
        "wudi": lambda d: wudi.merge(torch.zeros(d.shape[1:]), d, solver="adam", steps=300),
    }
    rows = []
    for method, op in ours_ops.items():
        worst, scale, per_shape = 0.0, 0.0, []
        started = time.perf_counter()
        ours = {n: op(d) for n, d in stacks.items()}
        our_seconds = time.perf_counter() - started
        for n in stacks:
            diff = float((ours[n] - theirs["results"][method][n]).abs().max())
            per_shape.append(f"{n} {diff:.1e}")
            worst = max(worst, diff)
            scale = max(scale, float(theirs["results"][method][n].abs().max()))
        rows.append((method, worst, worst / scale, our_seconds, theirs["seconds"][method], ", ".join(per_shape)))
    objective_rows = []
    for n, d in stacks.items():
        if d.dim() != 3:
            continue
        start = float(wudi.objective(d.sum(0), d))
        adam_theirs = float(wudi.objective(theirs["results"]["wudi"][n], d))
        closed = float(wudi.objective(wudi.closed_form(d), d))
        objective_rows.append((n, tuple(d.shape[1:]), start, adam_theirs, closed))

    lines = [
        "# Our matrix merges against FusionBench's own functions",
        "",
        "Generated by (FusionBench in its own venv, never a dependency of supermerge):",
        "",
        "```bash",
        f"python -m bench.fusionbench_bench --python {args.python} --out {args.out}",
        "```",
        "",
        "Wall seconds are from one run on a shared 2-core machine (first calls include warm-up): a rough guide only. "
        f"fusion-bench {version}, torch {torch.__version__}; k = {K} random task vectors per tensor, entries "
        f"N(0, 1e-6), shapes {', '.join(f'{n} {s}' for n, s in SHAPES.items())}; alpha = 1 (FusionBench's "
        "default), Iso-CTS common_space_fraction 0.8, WUDI 300 Adam steps at lr 1e-5 (ours: `solver: adam`).",
        "",
        "| method | max abs difference | relative to max abs value | ours s | FusionBench s | per tensor |",
        "|---|---|---|---|---|---|",
        *(f"| {m} | {d:.2e} | {r:.2e} | {a:.2f} | {b:.2f} | {p} |" for m, d, r, a, b, p in rows),
        "",
        "WUDI objective L = sum_i ||(X - tau_i) tau_i^T||^2 / ||tau_i||^2 reached (lower is better): the "
        "official start sum_i tau_i, FusionBench's Adam, our closed form (`solver: closed_form`, the default).",
        "",
        "| tensor | shape | L at the start | L after FusionBench's Adam | L of our closed form |",
        "|---|---|---|---|---|",
        *(f"| {n} | {s} | {a:.4e} | {b:.4e} | {c:.4e} |" for n, s, a, b, c in objective_rows),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

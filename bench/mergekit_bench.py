"""Head to head with mergekit: the same TIES and Task Arithmetic merge of k fine-tunes of a ~1B Llama.

Writes a randomly initialised Llama-style base (transformers' LlamaConfig, bf16 safetensors) and k
"fine-tunes" (the base plus seeded random deltas), tensor by tensor so that writing them holds one
tensor, never the model. Then merges them three ways, each in its own process, sampling the RSS of its
process tree: supermerge's library call ``stream_merge``, the ``supermerge merge`` command a user runs
(planning with its NaN/Inf scan of every input, the checkpoint store, checksums, publishing), and
``mergekit-yaml`` (same method, same parameters, fp32 math, bf16 output); and compares the outputs
tensor by tensor (TIES: separately on the tensors without magnitude ties at the trim threshold, where
the two tools keep different tied entries). The CLI run reads mergekit's own config file, unchanged.

    python -m bench.mergekit_bench --size 1b --workdir /tmp/mk-bench --mergekit /work/venvs/mergekit/bin/mergekit-yaml

mergekit runs in its own venv (``python -m venv --system-site-packages /work/venvs/mergekit &&
/work/venvs/mergekit/bin/pip install mergekit==0.1.5``), so it uses the same torch. Peak memory is reported
three ways: the kernel's high-water mark of the process (``ru_maxrss``, what ``/usr/bin/time -v``
prints), the highest sampled RSS of its tree, and the highest sampled anonymous RSS (``RssAnon``:
memory the process allocated, without the file pages it has mapped and read, which both tools map
when they read safetensors and which the kernel can drop at will). Before each run every input
file is read once, so both start with the inputs in the page cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from supermerge.merge_core.checkpoint import TensorMeta, open_checkpoint, write_shards_streaming
from supermerge.merge_core.merge import tensor_seed

log = logging.getLogger(__name__)

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4096),
    # TinyLlama-1.1B's shape: 1.10e9 parameters, 2.2 GB per bf16 checkpoint
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}
INIT_STD = 0.02
DELTA_STD = 0.002
"""Fine-tune deltas: a tenth of the weights' scale (about 13 bf16 steps of a typical weight)."""
METHODS: dict[str, dict[str, float]] = {
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.2, "lambda": 1.0},
}
SHARD_BYTES = 2 * 1024**3
MERGEKIT_SHARD = "1B"
"""mergekit counts shard size in parameters: 1B bf16 parameters is 2 GB, supermerge's default shard."""


# --- the models ------------------------------------------------------------------------------------

def _llama_config(size: str):
    from transformers import LlamaConfig

    config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    return config


def _metas(config) -> list[TensorMeta]:
    """The Llama's tensor names and shapes, from a model built on the meta device (no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [TensorMeta(n, tuple(t.shape), torch.bfloat16) for n, t in model.state_dict().items()]


def _randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _tensors(metas: list[TensorMeta], seed: int, model: int | None):
    """Base tensors (``model`` None), or model ``model``'s: base + its own seeded delta, in bf16."""
    for m in metas:
        base = _randn(m.shape, tensor_seed(seed, m.name)) * INIT_STD
        if m.name.endswith("norm.weight"):
            base = torch.ones(m.shape)
        if model is not None:
            base += _randn(m.shape, tensor_seed(seed + 1 + model, m.name)) * DELTA_STD
        yield m.name, base.to(torch.bfloat16)


def write_models(workdir: Path, size: str, k: int, seed: int) -> tuple[Path, list[Path]]:
    """The base and k fine-tunes under ``workdir`` (reused when already complete)."""
    config = _llama_config(size)
    metas = _metas(config)
    dirs = [workdir / "base"] + [workdir / f"ft{i}" for i in range(k)]
    for i, folder in enumerate(dirs):
        done = folder / ".complete"
        if done.is_file() and done.read_text() == f"{size} {seed}":
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        started = time.perf_counter()
        write_shards_streaming(folder, metas, _tensors(metas, seed, None if i == 0 else i - 1),
                               max_shard_bytes=SHARD_BYTES)
        config.save_pretrained(folder)
        done.write_text(f"{size} {seed}")
        log.info("wrote %s in %.0f s", folder, time.perf_counter() - started)
    return dirs[0], dirs[1:]


# --- running and measuring one merge ----------------------------------------------------------------

@dataclass
class Run:
    tool: str
    method: str
    command: str
    seconds: float
    peak_rss_bytes: int
    """Kernel high-water mark of the main process (ru_maxrss)."""
    sampled_rss_bytes: int
    """Highest sampled RSS of the process tree (every 50 ms)."""
    sampled_anon_bytes: int
    """Highest sampled anonymous RSS of the tree: without mapped file pages."""


def _anon_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _warm(paths: list[Path]) -> None:
    """Read every input file once so each run starts with the inputs in the page cache."""
    for folder in paths:
        for f in folder.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 * 2**20):
                    pass


def measure_command(tool: str, method: str, command: list[str], inputs: list[Path]) -> Run:
    _warm(inputs)
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks = {"rss": 0, "anon": 0}
    stop = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                tree = [root] + root.children(recursive=True)
                rss = sum(p.memory_info().rss for p in tree)
                anon = sum(_anon_bytes(p.pid) for p in tree)
            except psutil.Error:
                break
            peaks["rss"] = max(peaks["rss"], rss)
            peaks["anon"] = max(peaks["anon"], anon)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{tool} failed ({proc.returncode}):\n{' '.join(command)}\n{stderr[-3000:]}")
    return Run(tool, method, " ".join(command), seconds, usage.ru_maxrss * 1024, peaks["rss"], peaks["anon"])


def supermerge_command(base: Path, models: list[Path], method: str, out: Path) -> list[str]:
    spec = json.dumps({"base": str(base), "models": [str(m) for m in models], "method": method,
                       "params": METHODS[method], "out": str(out)})
    return [sys.executable, "-m", "bench.mergekit_bench", "--stream", spec]


def cli_command(mergekit_config: Path, out: Path) -> list[str]:
    """``supermerge merge`` on mergekit's own config file, unchanged: what a mergekit user runs. It plans
    first (headers, a NaN/Inf scan of every input, the memory plan), streams the one flat node into the
    checkpoint store beside the output, checksums it, and publishes it to ``out`` (hard links)."""
    return ["supermerge", "merge", str(mergekit_config), "--output", str(out), "--overwrite", "--device", "cpu"]


def mergekit_config(base: Path, models: list[Path], method: str) -> str:
    """mergekit's config for the same merge: weight 1 per model, fp32 math, bf16 out. TIES: mergekit's
    ``normalize`` divides by the summed weights of the agreeing models, which with weights of 1 is
    their count, our disjoint mean; ``lambda`` scales the result as our ``lam``."""
    params = METHODS[method]
    per_model = {"weight": 1.0} | ({"density": params["density"]} if "density" in params else {})
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for m in models:
        lines += [f"  - model: {m}", f"    parameters: {json.dumps(per_model)}"]
    shared = {"lambda": params["lambda"]} | ({"normalize": True} if method == "ties" else {})
    lines += [f"parameters: {json.dumps(shared)}", "dtype: float32", "out_dtype: bfloat16", ""]
    return "\n".join(lines)


def mergekit_command(mergekit: str, config: Path, out: Path) -> list[str]:
    return [mergekit, str(config), str(out), "--lazy-unpickle", "--out-shard-size", MERGEKIT_SHARD,
            "--no-copy-tokenizer", "--quiet"]


# --- comparing the outputs --------------------------------------------------------------------------

def _threshold_ties(base: Path, models: list[Path], name: str, density: float) -> bool:
    """Whether any model's task vector of tensor ``name`` has several entries tied at TIES' trim
    threshold (where the tools keep different entries)."""
    from supermerge.merge_core.methods.ties import _thresholds

    with open_checkpoint(base) as b:
        theta = b.get(name).float().reshape(-1)
    rows = []
    for m in models:
        with open_checkpoint(m) as ck:
            rows.append(ck.get(name).float().reshape(-1) - theta)
    flat = torch.stack(rows)
    keep = int(density * flat.shape[1])
    if keep >= flat.shape[1] or keep == 0:
        return False
    cut, _ = _thresholds(flat, [keep] * len(models))
    return bool(((flat.abs() == cut[:, None]).sum(1) > 1).any())


def compare(a: Path, b: Path, ties_of: Any = None) -> dict[str, Any]:
    """How far apart two bf16 models are: share of values not bit-identical, largest difference,
    and the largest difference relative to that tensor's largest |value|. ``ties_of(name)``: whether
    the tensor has magnitude ties at a TIES threshold; differing values are then split by it."""
    differing = total = 0
    untied_differing = untied_tensors = 0
    max_abs = max_rel = 0.0
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        if set(ca.keys()) != set(cb.keys()):
            raise SystemExit(f"{a} and {b} hold different tensors: {sorted(set(ca.keys()) ^ set(cb.keys()))[:5]}")
        for n in ca.keys():
            x, y = ca.get(n), cb.get(n)
            diff = (x.float() - y.float()).abs()
            differing += int((x != y).sum())
            total += x.numel()
            if ties_of is not None and not ties_of(n):
                untied_tensors += 1
                untied_differing += int((x != y).sum())
            top = float(diff.max())
            max_abs = max(max_abs, top)
            max_rel = max(max_rel, top / max(float(x.float().abs().max()), 1e-30))
            ca.close()
            cb.close()
    return {"values": total, "differing": differing, "differing_share": differing / total,
            "max_abs_diff": max_abs, "max_rel_diff": max_rel,
            "tensors_without_threshold_ties": untied_tensors, "differing_in_them": untied_differing}


# --- main --------------------------------------------------------------------------------------------

def _stream(spec_json: str) -> int:
    """The supermerge side, run in its own process."""
    from supermerge.merge_core.stream import stream_merge

    spec = json.loads(spec_json)
    stream_merge(spec["base"], [(f"ft{i}", m) for i, m in enumerate(spec["models"])], spec["method"],
                 spec["params"], spec["out"], shard_bytes=SHARD_BYTES, overwrite=True)
    return 0


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mk-bench"))
    parser.add_argument("--mergekit", default="/work/venvs/mergekit/bin/mergekit-yaml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", type=Path, help="write every number here too")
    parser.add_argument("--clean", action="store_true", help="delete the checkpoints and outputs afterwards")
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", type=Path, help="also write what is printed (and the command) here")
    args = parser.parse_args(argv)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.extend(text.splitlines())
    if args.stream:
        return _stream(args.stream)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    base, models = write_models(args.workdir, args.size, args.k, args.seed)
    with open_checkpoint(base) as ck:
        n_params = ck.numel()
    say(f"Llama {args.size}: {n_params / 1e9:.3f}e9 parameters, k = {args.k}, bf16; "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    runs: list[Run] = []
    agreement: dict[str, dict[str, Any]] = {}
    for method in args.methods:
        ours = args.workdir / f"out-supermerge-{method}"
        cli_out = args.workdir / f"cli-{method}" / "merged"
        theirs = args.workdir / f"out-mergekit-{method}"
        config = args.workdir / f"mergekit-{method}.yml"
        config.write_text(mergekit_config(base, models, method))
        shutil.rmtree(theirs, ignore_errors=True)
        shutil.rmtree(cli_out.parent, ignore_errors=True)
        runs.append(measure_command("supermerge", method, supermerge_command(base, models, method, ours),
                                    [base, *models]))
        runs.append(measure_command("sm-cli", method, cli_command(config, cli_out), [base, *models]))
        runs.append(measure_command("mergekit", method, mergekit_command(args.mergekit, config, theirs),
                                    [base, *models]))
        ties_of = None
        if method == "ties":
            def ties_of(name: str, method: str = method) -> bool:
                return _threshold_ties(base, models, name, METHODS[method]["density"])
        agreement[method] = compare(ours, theirs, ties_of)
        same = all((ours / f.name).read_bytes() == f.read_bytes() for f in sorted(cli_out.glob("*.safetensors")))
        for r in runs[-3:]:
            say(f"  {r.tool:10s} {method:16s} {r.seconds:7.1f} s  peak RSS {_gb(r.peak_rss_bytes)}  "
                f"sampled RSS {_gb(r.sampled_rss_bytes)}  anonymous {_gb(r.sampled_anon_bytes)}")
        sm, cli, mk = runs[-3], runs[-2], runs[-1]
        for who, r in (("stream_merge", sm), ("supermerge merge", cli)):
            say(f"  {method}: mergekit / {who}: time {mk.seconds / r.seconds:.2f}x, "
                f"peak RSS {mk.peak_rss_bytes / r.peak_rss_bytes:.2f}x, "
                f"anonymous {mk.sampled_anon_bytes / max(r.sampled_anon_bytes, 1):.2f}x")
        say(f"  {method}: supermerge merge (CLI) wrote the same weight bytes as stream_merge: {same}")
        a = agreement[method]
        say(f"  {method}: outputs differ in {a['differing']} of {a['values']} values "
              f"({100 * a['differing_share']:.4f} %), max |diff| {a['max_abs_diff']:.3g} "
              f"({a['max_rel_diff']:.3g} of the tensor's max)")
        if method == "ties":
            say(f"  ties: {a['tensors_without_threshold_ties']} tensor(s) without magnitude ties at the trim "
                f"threshold differ in {a['differing_in_them']} values")
        say(f"  mergekit command: {mk.command}")
        say("  mergekit config:\n    " + config.read_text().replace("\n", "\n    "))
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "k": args.k, "parameters": n_params,
                                         "runs": [asdict(r) for r in runs], "agreement": agreement}, indent=2))
    if args.markdown:
        command = "python -m bench.mergekit_bench " + " ".join(argv if argv is not None else sys.argv[1:])
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("```\n" + "\n".join(lines) + f"\n```\n\nCommand: `{command}`\n")
    if args.clean:
        shutil.rmtree(args.workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

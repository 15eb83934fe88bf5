"""A mergekit config runs unchanged through `supermerge merge` and gives mergekit's bytes.

Tiny fp32 Llamas (continuous random deltas: no magnitude ties at a TIES threshold, where the tools
keep different entries). Our output is compared with mergekit 0.1.5's in two ways: against the
sha256 of every tensor mergekit wrote for these same models (``mergekit_reference.json``, written by
``python -m tests.merge_core.test_mergekit`` with mergekit installed), always; and against a live
mergekit run when its venv (``MERGEKIT_VENV``, default /work/venvs/mergekit) is there, skipped
otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from supermerge.flows.cli import main
from supermerge.merge_core.checkpoint import open_checkpoint

REFERENCE = Path(__file__).with_name("mergekit_reference.json")
VENV = Path(os.environ.get("MERGEKIT_VENV", "/work/venvs/mergekit"))
CONFIGS = {
    # unequal weights, lambda 0.7
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                       "  - model: {ft0}\n    parameters: {{weight: 1.0}}\n"
                       "  - model: {ft1}\n    parameters: {{weight: 0.6}}\n"
                       "  - model: {ft2}\n    parameters: {{weight: 0.3}}\n"
                       "parameters: {{lambda: 0.7}}\ndtype: float32\n",
    # unequal weights and per-model densities; lambda and normalize left at mergekit's defaults
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n"
            "  - model: {ft0}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
            "  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            "  - model: {ft2}\n    parameters: {{weight: 0.8, density: 0.2}}\n"
            "dtype: float32\n",
}


def _llama(folder: Path, seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        names = {n: t.shape for n, t in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    if base is None:
        tensors = {n: 0.02 * torch.randn(s, generator=g) for n, s in names.items()}
    else:
        tensors = {n: base[n] + 0.002 * torch.randn(s, generator=g) for n, s in names.items()}
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    return tensors


def _models(root: Path) -> dict[str, Path]:
    base = _llama(root / "base", 0)
    paths = {"base": root / "base"}
    for i in range(3):
        _llama(root / f"ft{i}", 1 + i, base)
        paths[f"ft{i}"] = root / f"ft{i}"
    return paths


def _digests(folder: Path) -> dict[str, str]:
    with open_checkpoint(folder) as ck:
        return {n: hashlib.sha256(ck.get(n).contiguous().numpy().tobytes()).hexdigest() for n in sorted(ck.keys())}


def _config(root: Path, method: str, paths: dict[str, Path]) -> Path:
    cfg = root / f"{method}.yml"
    cfg.write_text(CONFIGS[method].format(**{k: str(v) for k, v in paths.items()}))
    return cfg


def _run_mergekit(config: Path, out: Path) -> None:
    subprocess.run([str(VENV / "bin" / "mergekit-yaml"), str(config), str(out), "--no-copy-tokenizer", "--quiet"],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("llamas")
    return root, _models(root)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_mergekit_config_gives_mergekits_bytes(models, method, capsys):
    root, paths = models
    out = root / f"ours-{method}"
    assert main(["merge", str(_config(root, method, paths)), "--output", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err.lower()
    record = json.loads((out / "supermerge.json").read_text())
    assert record["config"]["tree"]["flat"] is True
    expected = json.loads(REFERENCE.read_text())[method]
    assert _digests(out) == expected  # every tensor, bit for bit, as mergekit 0.1.5 wrote it


@pytest.mark.skipif(not (VENV / "bin" / "mergekit-yaml").is_file(), reason=f"mergekit 0.1.5 not installed in {VENV}")
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_live_mergekit_writes_what_the_reference_records(models, method):
    root, paths = models
    out = root / f"mergekit-{method}"
    _run_mergekit(_config(root, method, paths), out)
    assert _digests(out) == json.loads(REFERENCE.read_text())[method]


def test_what_a_mergekit_config_asks_and_supermerge_cannot_do_is_one_error(models, tmp_path):
    root, paths = models
    cfg = tmp_path / "slerp.yml"
    cfg.write_text(f"merge_method: slerp\nbase_model: {paths['base']}\nslices: []\nmodels:\n"
                   f"  - model: {paths['ft0']}\n    parameters: {{weight: [0.1, 0.9], epsilon: 0.1}}\n")
    assert main(["merge", str(cfg), "--output", str(tmp_path / "o")]) == 2
    cfg2 = tmp_path / "noout.yml"
    cfg2.write_text(CONFIGS["ties"].format(**{k: str(v) for k, v in paths.items()}))
    assert main(["merge", str(cfg2)]) == 2
    assert not (tmp_path / "o").exists()


if __name__ == "__main__":  # write the reference: mergekit's output for these models
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = _models(root)
        reference = {}
        for method in sorted(CONFIGS):
            _run_mergekit(_config(root, method, paths), root / f"mk-{method}")
            reference[method] = _digests(root / f"mk-{method}")
    REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE}", file=sys.stderr)

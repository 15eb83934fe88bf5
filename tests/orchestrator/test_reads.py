"""Each input is read once: one header and config.json per model per plan, one tokenisation per data
file per run (plan, nodes and final scoring share them)."""

from __future__ import annotations

import collections
import json
import pathlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from supermerge.merge_core import checkpoint, data, job
from supermerge.merge_core.config import parse_config
from supermerge.orchestrator.executor import execute
from supermerge.orchestrator.hardware import MemoryInventory
from supermerge.orchestrator.plan import plan
from tests.orchestrator.families import config_dict, family_data, make_config
from tests.tiny import TINY_VOCAB

PLENTY = MemoryInventory(ram_available_bytes=10**12, ram_total_bytes=10**12, process_bytes=0)
NAMES = ["pa", "pb", "qa", "qb"]


class Reads:
    """Counts, per file: checkpoint headers parsed, safetensors files opened, config.json files read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.headers: collections.Counter[Path] = collections.Counter()
        self.opens: collections.Counter[Path] = collections.Counter()
        self.configs: collections.Counter[Path] = collections.Counter()
        init, safe_open, read_text = checkpoint.Checkpoint.__init__, checkpoint.safe_open, pathlib.Path.read_text

        def counted_init(ckpt, path, *args, **kwargs):
            self.headers[Path(path).resolve()] += 1
            init(ckpt, path, *args, **kwargs)

        def counted_open(f, **kwargs):
            self.opens[Path(f).resolve()] += 1
            return safe_open(f, **kwargs)

        def counted_read(path, *args, **kwargs):
            if path.name == "config.json":
                self.configs[path.parent.resolve()] += 1
            return read_text(path, *args, **kwargs)

        monkeypatch.setattr(checkpoint.Checkpoint, "__init__", counted_init)
        monkeypatch.setattr(checkpoint, "safe_open", counted_open)
        monkeypatch.setattr(pathlib.Path, "read_text", counted_read)


@pytest.mark.parametrize(("tree", "tensor_passes"), [({}, 1), ({"max_fan_in": 2}, 2)])
def test_each_input_header_and_config_is_read_once_per_plan(
    tiny_base_dir, family_models, tmp_path, monkeypatch, tree, tensor_passes
):
    """A 4-model plan; a clustered tree also reads the task vectors for their similarity. Before the
    ModelInventory one plan parsed the base's header 3 times (4 with the similarity) and each model's
    once (2), opened the base's file 6 times (8) and each model's twice (4), and read each config.json
    3 times (4)."""
    config = make_config(tiny_base_dir, family_models, tmp_path / "out", NAMES, tree=tree)
    reads = Reads(monkeypatch)
    result = plan(config, inventory=PLENTY)
    assert len(result.nodes) == (1 if not tree else 3)
    folders = [Path(tiny_base_dir).resolve()] + [Path(family_models[n]["path"]).resolve() for n in NAMES]
    weights = [f / "model.safetensors" for f in folders]
    assert reads.headers == {f: 1 for f in folders}, reads.headers
    # the header's handle serves the finite check; the similarity is a second pass over the tensors
    assert reads.opens == {f: tensor_passes for f in weights}, reads.opens
    assert reads.configs == {f: 1 for f in folders}, reads.configs


@pytest.fixture
def jsonl_data(family_models, tmp_path) -> Iterator[dict[str, dict[str, Path]]]:
    """Validation and test data of pa and qa as text (JSONL), so the run tokenises them."""
    out = {}
    for i, name in enumerate(("pa", "qa")):
        files = {}
        for split, n, seed in (("validation", 16, 300 + i), ("test", 24, 400 + i)):
            task = family_data(name, n, seed)
            rows = [{"text": " ".join(TINY_VOCAB[t] for t in ids[1:-1]), "label": int(label)}
                    for ids, label in zip(task.inputs["input_ids"].tolist(), task.labels.tolist())]
            files[split] = tmp_path / f"{name}.{split}.jsonl"
            files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = files
    yield out


def test_each_data_file_is_tokenised_once_per_run(tiny_base_dir, family_models, jsonl_data, tmp_path, monkeypatch):
    """Planning checks every validation and test file, the node trains on the validation data and the
    run scores the root on the test data: 4 files, tokenised once each (it was 8: planning, the node
    and the final scoring each tokenised their own)."""
    raw = config_dict(tiny_base_dir, family_models, tmp_path / "out" / "merged", ["pa", "qa"])
    for entry in raw["models"]:
        entry["validation"] = str(jsonl_data[entry["name"]]["validation"])
        entry["test"] = str(jsonl_data[entry["name"]]["test"])
    raw["parameters"] = {"steps": 1, "lr": 0.05}
    tokenised: collections.Counter[int] = collections.Counter()
    loaded: collections.Counter[Path] = collections.Counter()
    tokenize, load_task_data = data.tokenize, job.load_task_data

    def counted_tokenize(texts, labels, tokenizer, max_length=64):
        tokenised[len(texts)] += 1
        return tokenize(texts, labels, tokenizer, max_length)

    def counted_load(path, *args, **kwargs):
        loaded[Path(path)] += 1
        return load_task_data(path, *args, **kwargs)

    monkeypatch.setattr(data, "tokenize", counted_tokenize)
    monkeypatch.setattr(job, "load_task_data", counted_load)
    with torch.random.fork_rng():
        report = execute(plan(parse_config(raw), inventory=PLENTY))
    assert set(report.test_accuracy) == {"pa", "qa"}  # the run did score the test data
    assert loaded == {f: 1 for files in jsonl_data.values() for f in files.values()}, loaded
    assert tokenised == {16: 2, 24: 2}, tokenised

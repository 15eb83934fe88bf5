"""Property test over random small configs and model shapes: the planner never exceeds its fan-in or its
budget, and running the plan either publishes a model serving every task or fails with one of the
errors docs/errors.md lists, leaving no output behind.

The models are tiny random BERTs (hidden 8 or 16, 1 or 2 layers) and "fine-tunes" made by adding seeded
noise to the base plus a random head: planning and merging need no trained model, and building them
takes milliseconds. Budgets are given against a fixed machine (a terabyte free, an empty process), so
an example plans the same everywhere.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from supermerge.merge_core.config import parse_config
from supermerge.merge_core.data import TaskData, save_task_data
from supermerge.merge_core.errors import SupermergeError
from supermerge.orchestrator.executor import execute
from supermerge.orchestrator.hardware import MemoryInventory
from supermerge.orchestrator.sizes import parse_bytes
from supermerge.orchestrator.plan import plan
from tests.errors_doc import documented_errors

MACHINE = MemoryInventory(ram_available_bytes=10**12, ram_total_bytes=10**12, process_bytes=0)
MAX_K = 5
SHAPES = list(itertools.product((8, 16), (1, 2)))
"""(hidden size, layers) of the random bases."""
METHODS = {
    "average": {},
    "task_arithmetic": {"lam": 0.4},
    "ties": {"density": 0.5, "lam": 1.0},
    "supermerge": {"steps": 1, "lr": 0.05, "batch_size": 8},
}


def _base(folder: Path, hidden: int, layers: int) -> Path:
    torch.manual_seed(hidden * 10 + layers)
    config = BertConfig(vocab_size=32, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _finetune(base: Path, folder: Path, seed: int, hidden: int) -> Path:
    """The base plus seeded noise, under BertForSequenceClassification's names, with a 2-class head."""
    g = torch.Generator().manual_seed(seed)
    tensors = {f"bert.{n}": t + 0.01 * torch.randn(t.shape, generator=g)
               for n, t in load_file(base / "model.safetensors").items()}
    tensors["classifier.weight"] = torch.randn(2, hidden, generator=g)
    tensors["classifier.bias"] = torch.zeros(2)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertForSequenceClassification"]}))
    return folder


def _validation(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 32, (8, 6), generator=g)
    save_task_data(TaskData({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                            torch.randint(0, 2, (8,), generator=g)), path)
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], dict[str, Any]]:
    """Per shape: a base and MAX_K fine-tunes, each with validation data."""
    root = tmp_path_factory.mktemp("random-models")
    out = {}
    for hidden, layers in SHAPES:
        folder = root / f"h{hidden}-l{layers}"
        base = _base(folder / "base", hidden, layers)
        models = [(_finetune(base, folder / f"t{i}", 100 * hidden + 10 * layers + i, hidden),
                   _validation(folder / f"t{i}.val.safetensors", i)) for i in range(MAX_K)]
        out[(hidden, layers)] = {"base": base, "models": models}
    return out


@st.composite
def merges(draw: st.DrawFn) -> dict[str, Any]:
    k = draw(st.integers(2, MAX_K))
    names = [f"t{i}" for i in range(k)]
    tree: dict[str, Any] = {}
    shape = draw(st.sampled_from(["planner", "max_fan_in", "flat", "groups"]))
    if shape == "max_fan_in":
        tree["max_fan_in"] = draw(st.integers(2, max(2, k - 1)))  # a tree, when k > 2
    elif shape == "flat":
        tree["flat"] = True
    elif shape == "groups":
        order = draw(st.permutations(names))
        cuts = sorted(draw(st.sets(st.integers(1, k - 1), max_size=k - 1)))
        tree["groups"] = [list(order[a:b]) for a, b in zip([0, *cuts], [*cuts, k], strict=True)]
        if draw(st.booleans()):
            tree["max_fan_in"] = draw(st.integers(2, k))
    if draw(st.booleans()):
        tree["memory_budget"] = f"{draw(st.integers(5_000, 200_000))}kB"
    return {"k": k, "names": names, "tree": tree, "method": draw(st.sampled_from(sorted(METHODS))),
            "shape": draw(st.sampled_from(SHAPES))}


@settings(max_examples=int(os.environ.get("SUPERMERGE_PROPERTY_EXAMPLES", "14")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=merges())
def test_plans_keep_their_fan_in_and_budget_and_runs_succeed_or_fail_with_a_documented_error(
    pool, tmp_path_factory, case
):
    models = pool[case["shape"]]
    work = tmp_path_factory.mktemp("example")
    output = work / "out" / "merged"
    raw = {"base": str(models["base"]), "output": str(output), "method": case["method"],
           "parameters": METHODS[case["method"]], "device": "cpu", "tree": case["tree"],
           "models": [{"name": n, "path": str(p), "validation": str(v)}
                      for n, (p, v) in zip(case["names"], models["models"], strict=False)]}
    documented = documented_errors()
    try:
        merge_plan = plan(parse_config(raw), inventory=MACHINE)
    except SupermergeError as e:
        event(f"refused while planning: {type(e).__name__}")
        assert type(e).__name__ in documented, f"{type(e).__name__} is not in docs/errors.md: {e}"
        assert not work.joinpath("out").exists()
        return
    tree = merge_plan.tree
    cap = case["tree"].get("max_fan_in")
    assert sorted(tree.models()) == case["names"]
    assert all(len(n.children) <= merge_plan.fan_in for n in merge_plan.nodes)
    streamed = case["method"] != "supermerge"  # fixed per-tensor merges run flat: the root's formula, once
    assert not streamed or len(merge_plan.nodes) == 1
    assert cap is None or case["tree"].get("flat") or streamed or merge_plan.fan_in <= cap
    assert len(merge_plan.nodes) == len(tree.merges()) and merge_plan.root.id == tree.root
    budget = case["tree"].get("memory_budget")
    if budget is not None:
        assert all(n.predicted.total <= parse_bytes(budget) for n in merge_plan.nodes)
    try:
        report = execute(merge_plan, store_dir=work / "store")
    except SupermergeError as e:
        event(f"failed while running: {type(e).__name__}")
        assert type(e).__name__ in documented, f"{type(e).__name__} is not in docs/errors.md: {e}"
        assert not output.exists()
        return
    event(f"merged: fan-in {merge_plan.fan_in}, {len(merge_plan.nodes)} node(s)")
    assert report.output == output and (output / "model.safetensors").is_file()
    assert sorted(p.stem for p in (output / "heads").glob("*.safetensors")) == case["names"]
    assert [r.id for r in report.nodes] == [n.id for n in merge_plan.nodes]

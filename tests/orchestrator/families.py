"""Tiny task models whose right grouping is known by construction, and configs that merge them.

Four families (p, q, r, s) of two members (a, b). A family's task labels a sentence positive when it
holds one of the family's three trigger tokens (disjoint across families). Both members are
fine-tuned from the same seed on the same sentences; member b's task flips every 16th label. Families
differ in triggers, seed and sentences. The task vectors' cosine is 0.6-0.85 within a family and below
0.1 across families, so a clustered merge tree must put each family under its own merge node.

A plain module (not conftest) so tests/flows can build the same models; they are built once per
session whichever test asks first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from supermerge.merge_core.config import MergeConfig, parse_config
from supermerge.merge_core.data import TaskData, save_task_data
from supermerge.merge_core.finetune import FinetuneConfig, finetune_classifier
from tests.tiny import TINY_VOCAB

TRIGGERS = {fam: (5 + 12 * i, 6 + 12 * i, 7 + 12 * i) for i, fam in enumerate("pqrs")}
FAMILIES = [[f"{fam}a", f"{fam}b"] for fam in TRIGGERS]
NAMES = [n for family in FAMILIES for n in family]
FLIP_EVERY = 16

FamilyModels = dict[str, dict[str, Path]]
"""task -> {"path": fine-tuned dir, "validation": 32 labelled examples (safetensors)}."""


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread. The test machine's 2 cores are shared with other work, and OpenMP
    threads spinning against it made these tiny models 4x slower; one thread gives the same results."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def family_data(task: str, n: int, seed: int, seq_len: int = 12) -> TaskData:
    """Random sentences labelled by ``task``'s family rule (every 16th label flipped for member b)."""
    family, member = task[0], task[1]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(TINY_VOCAB), (n, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    labels = torch.isin(ids, torch.tensor(TRIGGERS[family])).any(1).long()
    if member == "b":
        labels[::FLIP_EVERY] = 1 - labels[::FLIP_EVERY]
    return TaskData({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels)


_BUILT: dict[Path, FamilyModels] = {}


def build_family_models(base: Path, tmp_path_factory: pytest.TempPathFactory) -> FamilyModels:
    """The eight family models fine-tuned from ``base`` (once per base per session)."""
    if base in _BUILT:
        return _BUILT[base]
    root = tmp_path_factory.mktemp("families")
    out = {}
    with one_thread():
        for i, family in enumerate(TRIGGERS):
            for task in (f"{family}a", f"{family}b"):
                config = FinetuneConfig(epochs=6.0, lr=2e-3, batch_size=32, seed=i)
                path = finetune_classifier(base, family_data(task, 192, seed=100 + i), 2, root / task, config)
                val = root / f"{task}.val.safetensors"
                save_task_data(family_data(task, 32, seed=200 + i), val)
                out[task] = {"path": path, "validation": val}
    _BUILT[base] = out
    return out


def config_dict(
    base: Path, models: FamilyModels, output: Path, names: list[str] | None = None, **extra: object
) -> dict[str, object]:
    """A SuperMerge config over ``names`` (default: all) with a few training steps, on the CPU."""
    return {
        "base": str(base),
        "output": str(output),
        "method": "supermerge",
        "parameters": {"steps": 3, "lr": 0.05},
        "device": "cpu",
        "models": [
            {"name": n, "path": str(models[n]["path"]), "validation": str(models[n]["validation"])}
            for n in (names or list(models))
        ],
        **extra,
    }


def make_config(
    base: Path, models: FamilyModels, output: Path, names: list[str] | None = None, **extra: object
) -> MergeConfig:
    return parse_config(config_dict(base, models, output, names, **extra))

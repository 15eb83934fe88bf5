"""Tiny task models and a merge config for deploy/e2e.sh (seconds on a CPU, no network).

``python deploy/e2e_models.py DIR`` writes under DIR: a random tiny BERT base, six fine-tuned task
models in three families (pa, pb, qa, qb, ra, rb: the family models of tests/orchestrator, whose right
tree is known), their validation data, an empty registry, and ``config.yaml`` naming pa..ra and the
registry (fan-in 2). rb is left for the script to register. Prints the config's path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from merge_core.data import save_task_data
from merge_core.finetune import FinetuneConfig, finetune_classifier
from tests.orchestrator.families import TRIGGERS, family_data, one_thread
from tests.tiny import make_tiny_base

IN_CONFIG = ["pa", "pb", "qa", "qb", "ra"]
ARRIVING = "rb"


def build(root: Path) -> Path:
    base = make_tiny_base(root / "base")
    models = {}
    with one_thread():
        for i, family in enumerate(f for f in TRIGGERS if f in "pqr"):
            for task in (f"{family}a", f"{family}b"):
                config = FinetuneConfig(epochs=6.0, lr=2e-3, batch_size=32, seed=i)
                path = finetune_classifier(base, family_data(task, 192, seed=100 + i), 2, root / "models" / task,
                                           config)
                val = root / "data" / f"{task}.val.safetensors"
                val.parent.mkdir(parents=True, exist_ok=True)
                save_task_data(family_data(task, 32, seed=200 + i), val)
                models[task] = {"path": str(path), "validation": str(val), "test": str(val)}
    (root / "registry").mkdir()
    config = {
        "base": str(base),
        "output": "out/merged",
        "method": "supermerge",
        "parameters": {"steps": 3, "lr": 0.05},
        "device": "cpu",
        "models": [{"name": n, **models[n]} for n in IN_CONFIG],
        "tree": {"max_fan_in": 2},
        "retry": {"retries": 1, "retry_delay_seconds": 1},
        "registry": "registry",
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "arriving.yaml").write_text(yaml.safe_dump({"name": ARRIVING, **models[ARRIVING]}))
    return root / "config.yaml"


if __name__ == "__main__":
    print(build(Path(sys.argv[1]).resolve()))

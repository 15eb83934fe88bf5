"""Tiny task models and a merge config to try the deployment with (seconds on a CPU, no network).

    python deploy/e2e_models.py DIR        # needs only `pip install -e .` (no PYTHONPATH, no tests/)

writes under DIR: a random tiny BERT base with its tokenizer, seven task models fine-tuned from it
in four families (pa, pb, qa, qb, ra, rb, sa: a family's tasks share a labelling rule, so the right
tree pairs them), 32 validation examples each, an empty registry, ``config.yaml`` naming pa..ra and
the registry (fan-in 2), and ``crash.yaml``: the same models and registry merged with more training
steps into another output (slow enough to kill mid-run). rb and sa are left out, for `supermerge
register` to add (``arriving.yaml`` says where they are). Prints the config's path. deploy/e2e.sh uses it; the same models as tests/orchestrator's
family fixtures, built here from the installed package alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from transformers import BertConfig, BertModel, BertTokenizerFast

from supermerge.merge_core.data import TaskData, save_task_data
from supermerge.merge_core.finetune import FinetuneConfig, finetune_classifier

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]
TRIGGERS = {family: (5 + 12 * i, 6 + 12 * i, 7 + 12 * i) for i, family in enumerate("pqrs")}
"""A sentence of family f is positive when it holds one of f's trigger tokens."""
FLIP_EVERY = 16
"""Member b of a family flips every 16th label: a related task, not the same one."""
IN_CONFIG = ["pa", "pb", "qa", "qb", "ra"]
ARRIVING = ["rb", "sa"]
TASKS = ["pa", "pb", "qa", "qb", "ra", "rb", "sa"]


def tiny_base(out: Path) -> Path:
    """A random 2-layer, 32-wide BERT encoder and a word-level tokenizer over VOCAB."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    (out / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True).save_pretrained(out)
    return out


def task_data(task: str, n: int, seed: int, seq_len: int = 12) -> TaskData:
    """``n`` random token sentences labelled by ``task``'s family rule."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(VOCAB), (n, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    labels = torch.isin(ids, torch.tensor(TRIGGERS[task[0]])).any(1).long()
    if task[1] == "b":
        labels[::FLIP_EVERY] = 1 - labels[::FLIP_EVERY]
    return TaskData({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels)


def build(root: Path) -> Path:
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared machine
    base = tiny_base(root / "base")
    models = {}
    for task in TASKS:
        i = list(TRIGGERS).index(task[0])
        config = FinetuneConfig(epochs=6.0, lr=2e-3, batch_size=32, seed=i)
        path = finetune_classifier(base, task_data(task, 192, seed=100 + i), 2, root / "models" / task, config)
        val = root / "data" / f"{task}.val.safetensors"
        val.parent.mkdir(parents=True, exist_ok=True)
        save_task_data(task_data(task, 32, seed=200 + i), val)
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
    # 60 steps: about 1 s per node on 2 idle cores; 12 let the whole run finish (5 s) between two polls
    # of the checker on an idle machine, before it could be killed mid-run
    crash = {**config, "output": "out/crash", "parameters": {"steps": 60, "lr": 0.05}}
    (root / "crash.yaml").write_text(yaml.safe_dump(crash, sort_keys=False))
    (root / "arriving.yaml").write_text(yaml.safe_dump({n: models[n] for n in ARRIVING}))
    return root / "config.yaml"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python deploy/e2e_models.py DIR")
    print(build(Path(sys.argv[1]).resolve()))

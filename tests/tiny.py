"""Tiny BERT models and word-level tokenizers, built offline for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]


def tiny_config(**overrides: object) -> BertConfig:
    kwargs: dict[str, object] = dict(
        vocab_size=len(TINY_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def make_tiny_base(out_dir: Path, seed: int = 0) -> Path:
    """Save a random tiny BertModel (like the packaged MiniLM: a headless encoder) with a tokenizer."""
    torch.manual_seed(seed)
    model = BertModel(tiny_config())
    model.save_pretrained(out_dir, safe_serialization=True)
    vocab = out_dir / "vocab.txt"
    vocab.write_text("\n".join(TINY_VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(out_dir)
    return out_dir


# --- synthetic classification tasks a tiny BERT learns in seconds -------------------------------

TASK_TOKENS: dict[str, range] = {
    # label 1 when the sentence holds any of the task's trigger tokens (~40 % of random sentences)
    "alpha": range(5, 8),
    "beta": range(25, 28),
    "gamma": range(45, 48),
}


def make_task_data(task: str, n: int, seed: int, seq_len: int = 12):
    """Random token sentences labelled by a rule that differs per task (binary, ~40 % positive)."""
    from supermerge.merge_core.data import TaskData

    triggers = TASK_TOKENS[task]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(TINY_VOCAB), (n, seq_len), generator=g)
    ids[:, 0] = 2  # [CLS]
    ids[:, -1] = 3  # [SEP]
    labels = ((ids >= triggers.start) & (ids < triggers.stop)).any(1).long()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return TaskData(inputs, labels)


def task_vectors_and_validation(base_dir: Path, finetuned: dict[str, Path], tasks: tuple[str, ...]):
    """The task vectors of ``tasks``' tiny fine-tunes and 32 validation examples each (seeds 100, 101, ...):
    the setup the learned-merge tests share."""
    from supermerge.merge_core.checkpoint import open_checkpoint
    from supermerge.merge_core.task_vectors import load_task_vector

    with open_checkpoint(base_dir) as base:
        vectors = [load_task_vector(base, finetuned[t], name=t) for t in tasks]
    val = {t: make_task_data(t, 32, seed=100 + i) for i, t in enumerate(tasks)}
    return vectors, val


def make_finetuned(base_dir: Path, task: str, out_dir: Path, *, lora_rank: int | None = None,
                   seed: int = 0, n: int = 256, epochs: float = 12.0) -> Path:
    """Full fine-tune (or LoRA) of the tiny base on one synthetic task."""
    from supermerge.merge_core.finetune import FinetuneConfig, finetune_classifier

    lr = 3e-3 if lora_rank else 1e-3
    config = FinetuneConfig(epochs=epochs, lr=lr, batch_size=32, seed=seed, lora_rank=lora_rank)
    return finetune_classifier(base_dir, make_task_data(task, n, seed + 1), 2, out_dir, config)

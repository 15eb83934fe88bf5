"""Shared fixtures: tiny real models built in the test session (a few seconds, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import TASK_TOKENS, TINY_VOCAB, make_finetuned, make_tiny_base


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BertModel saved as a Hugging Face dir (safetensors + config + tokenizer)."""
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def tiny_finetuned(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One full fine-tune of the tiny base per synthetic task (alpha, beta, gamma)."""
    root = tmp_path_factory.mktemp("tiny-ft")
    return {t: make_finetuned(tiny_base_dir, t, root / t, seed=i) for i, t in enumerate(TASK_TOKENS)}


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


__all__ = ["TINY_VOCAB"]

"""Fixtures for the orchestrator's tests: the family models (see families.py), one torch thread."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.orchestrator.families import FamilyModels, build_family_models, one_thread


@pytest.fixture(scope="session")
def family_models(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FamilyModels:
    """task -> {"path": fine-tuned dir, "validation": 32 labelled examples (safetensors)}."""
    return build_family_models(tiny_base_dir, tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield

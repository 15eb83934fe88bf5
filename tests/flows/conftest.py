"""One Prefect test server for the whole session (about 11 s to start on an idle machine, 30-45 s on a
loaded one), with its home in a temp dir so nothing leaks between runs; the tiny family task models of
tests/orchestrator for merging."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.orchestrator.families import FamilyModels, build_family_models


@pytest.fixture(scope="session")
def family_models(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FamilyModels:
    """The eight family models of tests/orchestrator (built once a session, whichever asks first)."""
    return build_family_models(tiny_base_dir, tmp_path_factory)


PREFECT_ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A session-scoped ``prefect_test_harness``; flows and events go to its temporary server."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    env = {**PREFECT_ENV, "PREFECT_HOME": str(home)}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with temporary_settings({PREFECT_HOME: Path(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
            with prefect_test_harness(server_startup_timeout=120):
                yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

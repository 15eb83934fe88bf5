"""Published versions: v<N> dirs, the ``current`` link switched atomically, pruning, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supermerge.merge_core.errors import CheckpointError
from supermerge.orchestrator.publish import REPORT_FILE
from supermerge.orchestrator.versions import (CURRENT, check_versioned, current, next_version, prune, published_root_key,
                                   switch_current, versions)


def _version(output: Path, root_key: str) -> Path:
    v = next_version(output)
    v.mkdir(parents=True)
    (v / REPORT_FILE).write_text(json.dumps({"plan": {"nodes": [{"key": "child"}, {"key": root_key}]}}))
    return v


def test_versions_count_up_current_follows_and_pruning_keeps_the_newest(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert versions(out) == [] and current(out) is None and next_version(out) == out / "v1"
    for n in range(1, 12):
        v = _version(out, f"root{n}")
        switch_current(out, v)
        assert current(out) == out / f"v{n}" and published_root_key(current(out)) == f"root{n}"
    assert versions(out) == list(range(1, 12))  # numeric order, not v10 < v2
    assert (out / CURRENT).is_symlink() and not (out / CURRENT).readlink().is_absolute()  # the folder may move
    deleted = prune(out, 3)
    assert [p.name for p in deleted] == [f"v{n}" for n in range(1, 9)] and versions(out) == [9, 10, 11]
    switch_current(out, out / "v9")  # rolled back by hand: the current version is never pruned
    assert prune(out, 1) == [out / "v10"] and versions(out) == [9, 11]
    with pytest.raises(CheckpointError, match="at least 1"):
        prune(out, 0)


def test_a_one_off_output_and_a_dangling_current_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="holds a one-off merge"):
        check_versioned(out)
    other = tmp_path / "other"
    switch_current_target = _version(other, "k")
    switch_current(other, switch_current_target)
    check_versioned(other)
    switch_current_target.rename(other / "gone")
    with pytest.raises(CheckpointError, match="which is missing"):
        current(other)
    assert published_root_key(other / "gone" / "nothing") is None

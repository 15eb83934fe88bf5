"""How much disk the checkpoint store holds, and pruning what no published output uses.

The store (``.supermerge-store`` beside the outputs) keeps every finished merge node so that a killed
run resumes and a new task re-merges only its path to the root. A published output is hard links to
its root node's files, so those bytes are counted once on disk; the inner nodes of a tree, and nodes
of merges since replaced, are the store's alone. ``supermerge plan`` / ``merge`` print the usage;
``supermerge store prune`` removes the entries that no ``merge_report.json`` in the outputs' folder
names (``--all``: the whole store; outputs keep their bytes through their own links).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from supermerge.orchestrator.sizes import format_bytes


@dataclass(frozen=True)
class StoreUsage:
    root: Path
    entries: int
    bytes: int
    """Every file under the store."""
    own_bytes: int
    """Files with no other hard link (not shared with a published output): what pruning can free."""

    def render(self) -> str:
        if self.entries == 0:
            return f"checkpoint store {self.root}: empty"
        return (f"checkpoint store {self.root}: {self.entries} node(s), {format_bytes(self.bytes)} "
                f"({format_bytes(self.own_bytes)} not shared with an output); "
                "`supermerge store prune CONFIG` removes what no output uses")


def store_usage(root: Path) -> StoreUsage:
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    total = own = 0
    for f in root.rglob("*") if root.is_dir() else []:
        if f.is_file() and not f.is_symlink():
            st = f.stat()
            total += st.st_size
            own += st.st_size if st.st_nlink == 1 else 0
    return StoreUsage(root, len(entries), total, own)


def used_keys(outputs_folder: Path, report_file: str) -> set[str]:
    """Store keys every published output in ``outputs_folder`` names in its merge report."""
    keys: set[str] = set()
    for report in outputs_folder.glob(f"*/{report_file}"):
        try:
            nodes = json.loads(report.read_text()).get("nodes", [])
        except (OSError, json.JSONDecodeError):
            continue
        keys.update(str(n["key"]) for n in nodes if isinstance(n, dict) and "key" in n)
    return keys


def prune(root: Path, keep: set[str]) -> tuple[int, int]:
    """Remove every store entry whose key is not in ``keep``; returns
    (entries removed, bytes freed on disk)."""
    removed = freed = 0
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name in keep or entry.name.startswith("."):  # .locks: the store's own
            continue
        before = store_usage(entry).own_bytes if entry.is_dir() else entry.stat().st_size
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        removed, freed = removed + 1, freed + before
    return removed, freed

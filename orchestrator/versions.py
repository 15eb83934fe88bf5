"""Published versions of one output, for re-merges that run on a schedule or a trigger.

A one-off merge publishes its model at ``output`` and refuses to replace it without ``overwrite``. A
deployment re-merges into the same output night after night, so there each run publishes a new
version instead: ``<output>/v1``, ``<output>/v2``, ... (each written by ``publish.publish``, atomic),
then points ``<output>/current`` at it (a relative symlink, replaced by one rename, so a reader sees
the old version or the new one, never neither), then deletes the oldest versions beyond ``keep``.
A version is never changed once published; load ``<output>/current``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from supermerge.merge_core.errors import CheckpointError
from supermerge.orchestrator.publish import REPORT_FILE

log = logging.getLogger(__name__)

CURRENT = "current"
VERSION = re.compile(r"v(\d+)")


def versions(output: Path) -> list[int]:
    """The version numbers published under ``output``, oldest first."""
    if not output.is_dir():
        return []
    found = (VERSION.fullmatch(p.name) for p in output.iterdir() if p.is_dir() and not p.is_symlink())
    return sorted(int(m.group(1)) for m in found if m)


def current(output: Path) -> Path | None:
    """The version ``<output>/current`` points at, or None before the first one."""
    link = output / CURRENT
    if not link.is_symlink():
        return None
    target = output / os.readlink(link)
    if not target.is_dir():
        raise CheckpointError(f"{link} points at {target}, which is missing; point it at a version dir under "
                              f"{output} (ln -sfn vN {link}) or remove it")
    return target


def check_versioned(output: Path) -> None:
    """Refuse an ``output`` that holds a one-off merge (a model, not versions): publishing versions
    into it would mix the two."""
    if not output.exists():
        return
    stray = sorted(p.name for p in output.iterdir()
                   if not (p.name == CURRENT or VERSION.fullmatch(p.name) or p.name.startswith(".")))
    if stray:
        raise CheckpointError(f"{output} holds a one-off merge ({', '.join(stray[:3])}...), not published versions "
                              f"(v1, v2, ... and {CURRENT}); choose another output for versioned re-merges")


def next_version(output: Path) -> Path:
    """Where the next version goes: one past the highest published."""
    return output / f"v{max(versions(output), default=0) + 1}"


def switch_current(output: Path, version: Path) -> None:
    """Point ``<output>/current`` at ``version`` atomically (a new link renamed over the old one)."""
    tmp = output / f".{CURRENT}.{os.getpid()}.new"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(version.name, tmp)
    os.replace(tmp, output / CURRENT)
    log.info("%s -> %s", output / CURRENT, version.name)


def prune(output: Path, keep: int) -> list[Path]:
    """Delete the oldest versions beyond the newest ``keep`` (never the current one); the deleted."""
    if keep < 1:
        raise CheckpointError(f"keep must be at least 1 version, got {keep}")
    live = current(output)
    old = [output / f"v{n}" for n in versions(output)[:-keep]]
    doomed = [p for p in old if live is None or p.resolve() != live.resolve()]
    for p in doomed:
        shutil.rmtree(p)
        log.info("deleted old version %s (keeping %d)", p, keep)
    return doomed


def published_root_key(version: Path) -> str | None:
    """The store key of the root a published version holds (from its report), or None when its
    report cannot be read (then the version is not taken as up to date)."""
    try:
        return str(json.loads((version / REPORT_FILE).read_text())["plan"]["nodes"][-1]["key"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None

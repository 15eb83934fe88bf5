"""docs/errors.md, checked against the errors the code really gives.

Each row of the doc's tables is ``| case | input | raised as | message |``. The test that provokes a
case renders its row from the exception it caught (paths and sizes made generic by ``generic``) and
``check_row`` compares it with the doc's row of that case, so the doc cannot drift from the code.
After changing a message on purpose, rewrite the rows with

    SUPERMERGE_UPDATE_ERRORS_DOC=1 python -m pytest -q tests/flows/test_cli.py tests/flows/test_faults.py \
        tests/orchestrator/test_node.py tests/orchestrator/test_executor.py
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
UPDATE = "SUPERMERGE_UPDATE_ERRORS_DOC"
_SIZE = re.compile(r"\b\d+(?:\.\d+)? (?:GB|MB|kB|B)\b")


def generic(message: str, paths: Mapping[str, Path | str]) -> str:
    """The message on one line, each given path replaced by its placeholder (longest first) and
    every size by ``<size>``: what stays the same from run to run and machine to machine."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    for placeholder, path in sorted(paths.items(), key=lambda kv: -len(str(kv[1]))):
        text = text.replace(str(path), placeholder)
    return _SIZE.sub("<size>", text)


def row(case: str, what: str, raised: str, message: str, paths: Mapping[str, Path | str]) -> str:
    """A table row; ``raised``: an exception class name, or ``WARNING`` for a logged warning."""
    shown = f"`{raised}`" if raised != "WARNING" else "WARNING (logged; the run goes on)"
    return f"| {case} | {what} | {shown} | ``{generic(message, paths).replace('|', chr(92) + '|')}`` |"


def _rows() -> dict[str, str]:
    return {line.split("|")[1].strip(): line for line in DOC.read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| case ", "|---"))}


def check_row(case: str, what: str, error: BaseException | str, paths: Mapping[str, Path | str]) -> None:
    """The doc's row for ``case`` is the one rendered from ``error`` (an exception, or the text of a
    logged warning); with SUPERMERGE_UPDATE_ERRORS_DOC set, it is written there instead (a row that is
    not there yet is added at the end of the doc)."""
    if isinstance(error, str):
        expected = row(case, what, "WARNING", error, paths)
    else:
        expected = row(case, what, type(error).__name__, str(error), paths)
    rows = _rows()
    if os.environ.get(UPDATE):
        text = DOC.read_text()
        if case in rows:
            text = text.replace(rows[case], expected)
        else:
            text = text.rstrip("\n") + "\n" + expected + "\n"
        DOC.write_text(text)
        return
    assert case in rows, f"docs/errors.md has no row for {case!r}; add:\n{expected}\n(or run with {UPDATE}=1)"
    assert rows[case] == expected, (f"docs/errors.md's row for {case!r} differs from the error the code gives:\n"
                                    f"doc:  {rows[case]}\ncode: {expected}\n(update it, or run with {UPDATE}=1)")


def documented_cases() -> list[str]:
    return list(_rows())


def documented_errors() -> set[str]:
    """The exception classes docs/errors.md lists (its 'raised as' column; warnings are not errors)."""
    raised = {line.split("|")[3].strip() for line in _rows().values()}
    return {r.strip("`") for r in raised if r.startswith("`")}

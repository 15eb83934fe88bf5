"""Run ``supermerge merge`` or the ``hierarchical-merge`` flow, holding still at one point of one merge
node, so a test can SIGKILL the process there (or let it go on).

    python -m tests.flows.pausing KEY WHERE MARKER [--until FILE] merge CONFIG [supermerge merge options]
    python -m tests.flows.pausing KEY WHERE MARKER [--until FILE] flow CONFIG [flow parameters as JSON]

KEY: the store key of the node to hold at. WHERE: ``merging`` (the node's merge is done, its result in
memory, nothing of it written) or ``saved`` (its checkpoint is in the store; the next node has not
started). There the process writes MARKER and sleeps until FILE exists (for ever without --until).
torch runs on one thread, as the tests' reference runs do, so the merged bytes compare equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import supermerge.orchestrator.node

WHERE = ("merging", "saved")


def hold(marker: Path, until: Path | None) -> None:
    marker.write_text("here")
    while until is None or not until.exists():
        time.sleep(0.05)


def pause_at(key: str, where: str, marker: Path, until: Path | None) -> None:
    """Wrap the node runner's writer so the node with ``key`` holds before or after it writes."""
    save = supermerge.orchestrator.node.save_result

    def paused(result: Any, out_dir: Any, **kwargs: Any) -> Any:
        ours = Path(out_dir).name == key
        if ours and where == "merging":
            hold(marker, until)
        written = save(result, out_dir, **kwargs)
        if ours and where == "saved":
            hold(marker, until)
        return written

    supermerge.orchestrator.node.save_result = paused


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.flows.pausing")
    parser.add_argument("key")
    parser.add_argument("where", choices=WHERE)
    parser.add_argument("marker", type=Path)
    parser.add_argument("--until", type=Path)
    parser.add_argument("what", choices=("merge", "flow"))
    parser.add_argument("config")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pause_at(args.key, args.where, args.marker, args.until)
    if args.what == "merge":
        from supermerge.flows.cli import main as cli

        return cli(["merge", args.config, *args.rest])
    from supermerge.flows.hierarchical import hierarchical_merge

    params = json.loads(args.rest[0]) if args.rest else {}
    state = hierarchical_merge(config=args.config, return_state=True, **params)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

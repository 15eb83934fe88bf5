"""``supermerge register``: add a fine-tuned task model to a registry, and tell Prefect it arrived.

A model is checked before it is listed: its tensor headers against the registry's base (names,
shapes, dtypes; an adapter's targets), a task head to score it with, and its validation (and test)
data readable and labelled. A model that would make the next merge fail is refused here, in seconds,
not hours into a merge. Then ``registry.yaml`` is replaced atomically and, when a Prefect API is
configured (``PREFECT_API_URL``), the event ``supermerge.task-model.registered`` is emitted; the
``hierarchical-merge/local`` deployment's trigger (deploy/prefect.yaml) re-merges on it, growing
the previous tree (supermerge.orchestrator.incremental), so only the new model's path to the root is merged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supermerge.flows.console import os_error_line
from supermerge.merge_core.errors import ConfigError, DataError, SupermergeError
from supermerge.merge_core.task_registry import TaskRegistry, read_registry, write_registry
from supermerge.merge_core.task_vectors import DEFAULT_HEAD_PREFIXES

log = logging.getLogger(__name__)

EVENT = "supermerge.task-model.registered"
RESOURCE_PREFIX = "supermerge.task-model."
DEFAULT_REGISTRY = Path("registry")


@dataclass(frozen=True)
class Registration:
    """What ``register`` did: the entry listed, the registry file, and the event's id (None when no
    Prefect API is configured, so nothing was emitted)."""

    entry: dict[str, Any]
    registry_file: Path
    event_id: str | None


def check_model(
    base: Path, model_dir: Path, task: str, val: Path, test: Path | None, *,
    head_prefixes: Sequence[str] = DEFAULT_HEAD_PREFIXES, max_length: int = 64,
) -> None:
    """Refuse a model the next merge would refuse, with the checks ``supermerge merge`` runs while it
    plans (supermerge.merge_core.preflight): a base that is unreadable or not finite, tensors that do not fit it
    or hold NaN/Inf, a config.json of another architecture, no task head, and validation or test data
    that is unreadable, empty, unlabelled, or labelled outside the head's classes."""
    from supermerge.merge_core.checkpoint import open_checkpoint
    from supermerge.merge_core.data import load_task_data, require_labelled
    from supermerge.merge_core.job import load_tokenizer
    from supermerge.merge_core.labels import label_ids
    from supermerge.merge_core.preflight import (
        check_base,
        check_model_config,
        check_task_data,
        model_config,
        task_heads,
    )

    base_config = model_config(base)
    with open_checkpoint(base) as base_ckpt:
        check_base(base_ckpt, base_config, max_length=max_length)
        heads = task_heads(base_ckpt, model_dir, task, head_prefixes)
    check_model_config(base_config, model_dir, model_config(model_dir))
    head = heads.get(task, next(iter(heads.values())) if len(heads) == 1 else None)
    if head is None:
        raise DataError(f"{model_dir} carries no task head ({', '.join(head_prefixes)}*) for task {task!r}, so it "
                        "cannot be scored or merged on its data; register a *ForSequenceClassification "
                        "fine-tune or an adapter with modules_to_save=['classifier']")
    tokenizer = load_tokenizer(base)
    for split, path in (("validation", val), ("test", test)):
        if path is not None:
            data = load_task_data(path, tokenizer, max_length, label_ids(model_dir, task))
            data = require_labelled(task, data, split)
            check_task_data(task, data, head, str(path), base_config)


def register(
    model_dir: str | os.PathLike[str],
    task: str,
    val: str | os.PathLike[str],
    registry: str | os.PathLike[str] = DEFAULT_REGISTRY,
    *,
    test: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    replace: bool = False,
    head_prefixes: Sequence[str] = DEFAULT_HEAD_PREFIXES,
    max_length: int = 64,
) -> Registration:
    """Check ``model_dir`` (task ``task``, validation data ``val``) and list it in ``registry``.

    ``base``: the pretrained model every registered model must fit; needed for the first registration
    (it is kept in registry.yaml), checked against the kept one afterwards. ``replace``: list a model
    under a name already taken (a re-trained model), in the old one's place.
    """
    from supermerge.merge_core.config import ModelEntry

    folder = Path(registry).resolve()
    current = read_registry(folder, missing_ok=True)
    kept = current.base
    given = Path(base).resolve() if base is not None else None
    if kept is None and given is None:
        raise ConfigError(f"registry {folder} is new: give the base model the task models were fine-tuned from "
                          "(--base)")
    if kept is not None and given is not None and kept.resolve() != given:
        raise ConfigError(f"registry {folder} holds models of the base {kept}, not {given}; use another registry")
    base_path = kept if kept is not None else given
    assert base_path is not None
    paths = {"path": Path(model_dir).resolve(), "validation": Path(val).resolve(),
             "test": Path(test).resolve() if test is not None else None}
    missing = [f"{k} {p}" for k, p in paths.items() if p is not None and not p.exists()]
    if missing:
        raise ConfigError(f"cannot register task {task!r}: {', '.join(missing)} does not exist")
    try:
        entry = ModelEntry(name=task, **paths).model_dump(mode="json", exclude_none=True)
    except ValueError as e:
        raise ConfigError(f"cannot register task {task!r}: {e}") from None
    if task in current.names() and not replace:
        raise ConfigError(f"task {task!r} is already registered in {current.file}; choose another name, or "
                          "pass replace (--replace) to list this model in its place")
    check_model(base_path, paths["path"], task, paths["validation"], paths["test"],
                head_prefixes=head_prefixes, max_length=max_length)
    models = [m for m in current.models if m["name"] != task] if replace else list(current.models)
    if replace and task in current.names():
        models.insert(current.names().index(task), entry)
    else:
        models.append(entry)
    written = write_registry(TaskRegistry(folder, base_path, models))
    event_id = emit_registered(entry, written)
    log.info("registered %s (%s) in %s%s", task, paths["path"], written,
             f"; event {event_id}" if event_id else "; no Prefect API configured, no event")
    return Registration(entry, written, event_id)


def unregister(task: str, registry: str | os.PathLike[str] = DEFAULT_REGISTRY) -> Path:
    """Take ``task`` off the registry (its files are left alone); the next merge leaves it out. The
    registry file is replaced atomically. No event is emitted: removing a model re-merges nothing."""
    folder = Path(registry).resolve()
    current = read_registry(folder)
    if task not in current.names():
        raise ConfigError(f"task {task!r} is not registered in {current.file}; registered: {current.names() or 'none'}")
    written = write_registry(TaskRegistry(folder, current.base, [m for m in current.models if m["name"] != task]))
    log.info("unregistered %s from %s", task, written)
    return written


def emit_registered(entry: dict[str, Any], registry_file: Path) -> str | None:
    """Emit ``supermerge.task-model.registered`` for ``entry`` when ``PREFECT_API_URL`` is set; the
    event's id, or None when there is no API to tell."""
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return None
    event = emit_event(
        event=EVENT,
        resource={
            "prefect.resource.id": f"{RESOURCE_PREFIX}{entry['name']}",
            "prefect.resource.name": str(entry["name"]),
            "supermerge.registry": str(registry_file.parent),
        },
        payload={"entry": entry, "registry_file": str(registry_file)},
    )
    if event is None:
        raise ConfigError(f"PREFECT_API_URL is {PREFECT_API_URL.value()}, but Prefect did not take the event "
                          f"{EVENT}; is the server reachable? The model is registered; re-run the merge by hand")
    return str(event.id)


def register_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``register`` subcommand's arguments (for ``supermerge register``)."""
    p.add_argument("model_dir", type=Path, help="fine-tuned model dir or PEFT adapter dir")
    p.add_argument("--task", required=True, help="the task's name (the model's name in merges)")
    p.add_argument("--val", required=True, type=Path, help="labelled validation data (.jsonl or .safetensors)")
    p.add_argument("--test", type=Path, help="labelled test data, for evaluation")
    p.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY,
                   help=f"registry folder holding registry.yaml (default ./{DEFAULT_REGISTRY})")
    p.add_argument("--base", type=Path, help="the base model; required for a new registry")
    p.add_argument("--replace", action="store_true", help="replace a model registered under the same name")
    return p


def register_command(argv: Sequence[str] | None = None) -> int:
    """``supermerge register MODEL_DIR --task NAME --val DATA [--registry DIR]``; exit 2 on a refusal."""
    parser = register_arguments(argparse.ArgumentParser(
        prog="supermerge register", description="check a task model and add it to a registry"))
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        done = register(args.model_dir, args.task, args.val, args.registry, test=args.test, base=args.base,
                        replace=args.replace)
    except SupermergeError as e:
        print(f"supermerge: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:

        print(f"supermerge: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("supermerge: interrupted; the registry is unchanged", file=sys.stderr)
        return 130
    print(f"registered {args.task} in {done.registry_file}"
          + (f"; event {EVENT} {done.event_id}" if done.event_id else " (no Prefect API configured: no event)"))
    return 0


def unregister_command(argv: Sequence[str] | None = None) -> int:
    """``supermerge unregister --task NAME [--registry DIR]``; exit 2 on a refusal."""
    parser = argparse.ArgumentParser(prog="supermerge unregister", description="take a task model off a registry")
    parser.add_argument("--task", required=True, help="the registered task's name")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY,
                        help=f"registry folder holding registry.yaml (default ./{DEFAULT_REGISTRY})")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        written = unregister(args.task, args.registry)
    except SupermergeError as e:
        print(f"supermerge: error: {e}", file=sys.stderr)
        return 2
    print(f"unregistered {args.task} from {written}")
    return 0


if __name__ == "__main__":
    sys.exit(register_command())

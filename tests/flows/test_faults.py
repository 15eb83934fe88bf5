"""Nothing poisoned is published (issue 19): every bad input one line before work, non-finite results
never stored, labels checked against heads, content-true store keys, OS errors and SIGINT one line,
and nothing left behind (no output, no store entry, no lock file) by a run that fails.

Each case's message is the doc's row (docs/errors.md, via tests/errors_doc.py).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
import yaml
from safetensors.torch import load_file, save_file

from supermerge.flows.cli import INTERRUPTED, build_parser, cmd_merge, main, options_from_args
from supermerge.merge_core.data import TaskData, save_task_data
from supermerge.merge_core.errors import SupermergeError
from tests.errors_doc import check_row, generic
from tests.flows.test_cli import (  # noqa: F401 - fixtures used by name
    _copy_model,
    _edit_config,
    _one_thread,
    _set_model_field,
    _set_model_path,
    tiny_finetuned,
    workspace,
)

KEY = "bert.encoder.layer.0.attention.self.key.weight"


def _files(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file, folder and link under ``roots`` with its size and modification time (lstat: a
    symlink loop is listed, not followed)."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            out[str(p)] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def _paths(ws: Path, base: Path, ft: dict[str, Path]) -> dict[str, Path]:
    return {"<workspace>": ws, "<base>": base, "<models>": ft["alpha"].parent}


def _own_base(ws: Path, base: Path) -> Path:
    """A copy of the base in the workspace, to damage; the config names it."""
    copy = ws / "base"
    shutil.copytree(base, copy)
    _edit_config(ws, base=str(copy))
    return copy


def _param(**params):
    def make(ws, ft, base):
        _edit_config(ws, parameters=params)
        return []
    return make


def _per_tensor(method: str, **params):
    def make(ws, ft, base):
        _edit_config(ws, method=method, parameters=params)
        return []
    return make


def _lr_nan(ws, ft, base):
    text = (ws / "config.yaml").read_text().replace("lr: 0.05", "lr: .nan")
    (ws / "config.yaml").write_text(text)
    return []


def _max_length(ws, ft, base):
    _edit_config(ws, max_length=512)
    return []


def _overwrite_file(ws, ft, base):
    (ws / "out").mkdir()
    (ws / "out" / "merged").write_text("the user's own file")
    return ["--overwrite"]


def _empty_base_config(ws, ft, base):
    (_own_base(ws, base) / "config.json").write_text("")
    return []


def _base_without_config(ws, ft, base):
    (_own_base(ws, base) / "config.json").unlink()
    return []


def _symlink_loop(ws, ft, base):
    (ws / "loop").symlink_to(ws / "loop")
    _set_model_path(ws, "alpha", ws / "loop")
    return []


def _output_parent_file(ws, ft, base):
    (ws / "out").write_text("a file where the output's folder would be")
    return []


def _output_is_store(ws, ft, base):
    return ["--output", str(ws / "out" / ".supermerge-store")]


def _nan_base(ws, ft, base):
    copy = _own_base(ws, base)
    tensors = load_file(copy / "model.safetensors")
    tensors["encoder.layer.1.output.dense.bias"][3] = float("nan")
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return []


def _jsonl_data(ws: Path, name: str, rows: list[dict], split: str = "validation", model: str = "alpha") -> None:
    (ws / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    _set_model_field(ws, model, split, f"data/{name}")


def _label(value, split="validation"):
    def make(ws, ft, base):
        _jsonl_data(ws, "bad.jsonl", [{"text": "w1 w2", "label": 1}, {"text": "w3 w4", "label": value}], split)
        return []
    return make


def _all_ignored(ws, ft, base):
    _jsonl_data(ws, "bad.jsonl", [{"text": "w1 w2", "label": -100}, {"text": "w3", "label": -100}])
    return []


def _null_text(ws, ft, base):
    _jsonl_data(ws, "bad.jsonl", [{"text": "w1 w2", "label": 1}, {"text": None, "label": 0}])
    return []


def _empty_text(ws, ft, base):
    _jsonl_data(ws, "bad.jsonl", [{"text": "  ", "label": 1}])
    return []


def _token_ids(ws, ft, base):
    ids = torch.full((4, 6), 70)  # the tiny vocabulary has 64 tokens
    save_task_data(TaskData({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.zeros(4, dtype=torch.long)),
                   ws / "data" / "ids.safetensors")
    _set_model_field(ws, "alpha", "validation", "data/ids.safetensors")
    return []


def _data_directory(ws, ft, base):
    (ws / "data" / "folder").mkdir()
    _set_model_field(ws, "alpha", "validation", "data/folder")
    return []


def _config_differs(ws, ft, base):
    copy = _copy_model(ws, ft, "relu")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["hidden_act"] = "relu"
    (copy / "config.json").write_text(json.dumps(cfg))
    return []


def _duplicate_key(ws, ft, base):
    (ws / "config.yaml").write_text((ws / "config.yaml").read_text() + "method: ties\n")
    return []


def _alias_bomb(ws, ft, base):
    lines = ["a0: &a0 [alpha, alpha, alpha, alpha, alpha, alpha, alpha, alpha, alpha]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 6)]
    cfg = yaml.safe_load((ws / "config.yaml").read_text())
    text = "\n".join(lines) + "\n" + yaml.safe_dump(cfg) + "tree: {groups: *a5}\n"
    (ws / "config.yaml").write_text(text)
    return []


def _malformed_registry(ws, ft, base):
    (ws / "registry").mkdir()
    (ws / "registry" / "registry.yaml").write_text("[]\n")
    _edit_config(ws, registry="registry")
    return []


FAULTS = {
    "param-steps-text": ("a learned merge's steps given as text", _param(steps="ten")),
    "param-steps-float": ("a learned merge's steps not an integer", _param(steps=2.5)),
    "param-lr-text": ("a learning rate given as text", _param(lr="fast")),
    "param-lr-nan": ("a learning rate .nan", _lr_nan),
    "param-batch-size-float": ("a batch size not an integer", _param(batch_size=2.5)),
    "param-seed-text": ("a seed given as text", _param(seed="abc")),
    "param-lam-empty": ("an empty list of lam values", _per_tensor("task_arithmetic", lam=[])),
    "param-lam-not-a-number": ("a lam list holding text", _per_tensor("task_arithmetic", lam=[0.5, "x"])),
    "param-lam-overflows-fp32": ("lam finite as float64, infinite in fp32", _per_tensor("task_arithmetic", lam=1e39)),
    "max-length-above-positions": ("max_length above the model's positions", _max_length),
    "overwrite-onto-file": ("--overwrite onto a regular file", _overwrite_file),
    "base-config-empty": ("a zero-byte base config.json", _empty_base_config),
    "base-without-config": ("text data, a base without config.json", _base_without_config),
    "symlink-loop": ("a symlink loop as a model path", _symlink_loop),
    "output-parent-is-file": ("an output whose parent is a file", _output_parent_file),
    "output-is-store": ("an output that is the checkpoint store", _output_is_store),
    "nan-in-base": ("a NaN in the base", _nan_base),
    "label-out-of-range": ("a validation label 7 for a 2-class head", _label(7)),
    "label-negative": ("a validation label -1", _label(-1)),
    "label-all-ignored": ("validation labels all -100", _all_ignored),
    "label-float": ("a float label (0.9)", _label(0.9)),
    "test-label-out-of-range": ("a bad label only in the test data", _label(7, "test")),
    "text-null": ("a null text", _null_text),
    "text-empty": ("an empty text", _empty_text),
    "token-ids-outside-vocab": ("ready-made token ids outside the vocabulary", _token_ids),
    "data-is-directory": ("a directory given as validation data", _data_directory),
    "finetune-config-differs": ("a fine-tune whose config.json has another activation", _config_differs),
    "yaml-duplicate-key": ("a config giving method: twice", _duplicate_key),
    "yaml-alias-bomb": ("a config whose aliases expand to 9^6 values", _alias_bomb),
    "registry-malformed": ("a registry.yaml that is not a registry", _malformed_registry),
}


FAULTS_RUNNING = ["non-finite-result-streamed", "non-finite-result-searched", "disk-full", "output-not-writable",
                  "interrupted"]
FAULTS_WARNINGS = ["finetune-config-training-only"]
"""The doc's rows of the other tables that the tests below provoke, in the doc's order."""


def _left_behind(ws: Path) -> list[str]:
    """Store entries, lock files and partial outputs under the workspace's out/ folder."""
    out = ws / "out"
    return sorted(str(p.relative_to(ws)) for p in out.rglob("*")) if out.is_dir() else []


@pytest.mark.parametrize("case", list(FAULTS))
def test_bad_input_is_refused_before_work_in_one_line(workspace, tiny_base_dir, tiny_finetuned, capsys, case):
    what, make_bad = FAULTS[case]
    options = make_bad(workspace, tiny_finetuned, tiny_base_dir)
    argv = ["merge", str(workspace / "config.yaml"), *options]
    before = _files(workspace, tiny_base_dir, tiny_finetuned["alpha"].parent)

    started = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - started < 30  # the alias bomb took 166 s
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "supermerge: error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err

    args = build_parser().parse_args(argv)
    with pytest.raises(SupermergeError) as refused:
        cmd_merge(args.config, options_from_args(args))
    capsys.readouterr()
    assert generic(f"supermerge: error: {refused.value}".splitlines()[0], {}) == generic(errors[0], {})
    assert _files(workspace, tiny_base_dir, tiny_finetuned["alpha"].parent) == before, "something was written"
    check_row(case, what, refused.value, _paths(workspace, tiny_base_dir, tiny_finetuned))


def test_a_bare_integer_memory_budget_is_a_number_of_bytes(workspace, capsys):
    _edit_config(workspace, tree={"memory_budget": 64 * 2**30})
    assert main(["plan", str(workspace / "config.yaml")]) == 0
    from supermerge.merge_core.config import load_config

    assert load_config(workspace / "config.yaml").tree.memory_budget == str(64 * 2**30)


def test_a_training_only_config_difference_is_merged_with_a_warning(workspace, tiny_base_dir, tiny_finetuned,
                                                                    caplog):
    from supermerge.merge_core.config import load_config
    from supermerge.orchestrator.plan import plan

    copy = _copy_model(workspace, tiny_finetuned, "dropout")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["hidden_dropout_prob"] = 0.1
    (copy / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        plan(load_config(workspace / "config.yaml"))
    warning = next(r.getMessage() for r in caplog.records if "training-only" in r.getMessage())
    check_row("finetune-config-training-only", "a fine-tune whose config.json differs in dropout only", warning,
              _paths(workspace, tiny_base_dir, tiny_finetuned))


# --- while running: a non-finite result, a full disk, a read-only folder, SIGINT ----------------------


def _huge_values(ws: Path, ft: dict[str, Path]) -> None:
    """Both fine-tunes hold 1e38 (finite in fp32) at one value of one tensor: their sum overflows."""
    for name in ("alpha", "beta"):
        copy = ws / f"huge-{name}"
        shutil.copytree(ft[name], copy)
        tensors = load_file(copy / "model.safetensors")
        tensors[KEY][0, 0] = 1e38
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
        _set_model_path(ws, name, copy)


@pytest.mark.parametrize(("case", "parameters"), [
    ("non-finite-result-streamed", {"lam": 2.0}),
    ("non-finite-result-searched", {"lam": [2.0, 3.0]}),
])
def test_a_non_finite_result_names_node_and_tensor_and_nothing_enters_the_store(
    workspace, tiny_base_dir, tiny_finetuned, capsys, case, parameters
):
    _huge_values(workspace, tiny_finetuned)
    _edit_config(workspace, method="task_arithmetic", parameters=parameters)
    assert main(["merge", str(workspace / "config.yaml")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("supermerge:")]
    assert len(lines) == 1 and "merge-alpha+" in lines[0] and KEY[5:] in lines[0] and "Traceback" not in err, err
    assert _left_behind(workspace) == []
    from supermerge.merge_core.errors import NonFiniteError

    args = build_parser().parse_args(["merge", str(workspace / "config.yaml")])
    with pytest.raises(NonFiniteError) as refused:
        cmd_merge(args.config, options_from_args(args))
    what = "fine-tunes whose values are finite but whose merge overflows fp32"
    check_row(case, f"{what} ({'streamed' if 'lam' in parameters and not isinstance(parameters['lam'], list) else 'grid search'})",
              refused.value, _paths(workspace, tiny_base_dir, tiny_finetuned))
    assert _left_behind(workspace) == []


@pytest.mark.parametrize(("method", "parameters"), [("task_arithmetic", {"lam": 0.5}),  # streamed shards
                                                    ("supermerge", {"steps": 2})])  # safetensors' save_file
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(workspace, tiny_base_dir, tiny_finetuned, capsys,
                                                                    method, parameters):
    """A write past RLIMIT_FSIZE fails with EFBIG, as a full disk fails with ENOSPC: the same paths."""
    _edit_config(workspace, method=method, parameters=parameters)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # the merged weights are ~130 kB
    try:
        rc = main(["merge", str(workspace / "config.yaml")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "supermerge: error:" in line]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "File too large" in lines[0] and "/out/.supermerge-store/." in lines[0]
    assert _left_behind(workspace) == [] and not (workspace / "out").exists()
    if method != "task_arithmetic":
        return
    check_row("disk-full", "a write that fails (a full disk; here a file-size limit)",
              OSError(lines[0].removeprefix("supermerge: error: ")),
              {**_paths(workspace, tiny_base_dir, tiny_finetuned), "<partial>": _partial_name(lines[0])})


def _partial_name(line: str) -> str:
    """The temporary folder's random name in a message, so the doc's row stays the same."""
    start = line.index("/out/.supermerge-store/.") + len("/out/.supermerge-store/")
    return line[start:].split("/")[0]


def test_an_output_folder_that_cannot_be_written_is_one_line_naming_it(workspace, tiny_base_dir, tiny_finetuned,
                                                                       capsys):
    """/sys refuses new files even to root (EPERM), as a read-only filesystem does (EROFS)."""
    _edit_config(workspace, method="task_arithmetic", parameters={"lam": 0.5})
    assert main(["merge", str(workspace / "config.yaml"), "--output", "/sys/merged"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "supermerge: error:" in line]
    assert len(lines) == 1 and lines[0].startswith("supermerge: error: /sys/.supermerge-store: ") and "Traceback" not in err
    assert not Path("/sys/merged").exists()
    check_row("output-not-writable", "an output folder this process may not write (/sys)",
              OSError(lines[0].removeprefix("supermerge: error: ")), {})


def test_sigint_exits_130_in_one_line_and_leaves_no_lock_or_entry(workspace, capsys):
    _edit_config(workspace, parameters={"steps": 100000, "lr": 0.05})
    locks = workspace / "out" / ".supermerge-store" / ".locks"

    def interrupt_once_merging() -> None:
        deadline = time.time() + 600  # generous: on a loaded 2-core machine planning alone can pass a minute
        while time.time() < deadline and not (locks.is_dir() and any(locks.iterdir())):
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

    # Python raises KeyboardInterrupt only if SIGINT was not ignored when it started; a suite run in the
    # background (nohup, `&` without job control) inherits SIG_IGN, so the test sets Python's own handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_once_merging, daemon=True).start()
        assert main(["merge", str(workspace / "config.yaml")]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("supermerge:")]
    assert lines == [INTERRUPTED] and "Traceback" not in err
    assert _left_behind(workspace) == []
    check_row("interrupted", "SIGINT (Ctrl-C) during a merge", KeyboardInterrupt(INTERRUPTED.removeprefix(
        "supermerge: ")), {})


# --- the store key is content -------------------------------------------------------------------------


def test_a_changed_value_with_the_same_size_and_mtime_is_merged_again(workspace, tiny_finetuned, capsys):
    _edit_config(workspace, method="task_arithmetic", parameters={"lam": 0.5})
    copy = _copy_model(workspace, tiny_finetuned, "alpha-copy")
    assert main(["merge", str(workspace / "config.yaml")]) == 0
    first = (workspace / "out" / "merged" / "model.safetensors").read_bytes()

    weights = copy / "model.safetensors"
    st = weights.stat()
    tensors = load_file(weights)
    tensors[KEY][0, 0] += 0.25  # one value; same shape, dtype and so the same size
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # as touch -r, cp -p, tar x, rsync -t leave it
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    capsys.readouterr()
    assert main(["merge", str(workspace / "config.yaml"), "--output", str(workspace / "out" / "again")]) == 0
    assert "reused from the store" not in capsys.readouterr().out
    again = (workspace / "out" / "again" / "model.safetensors").read_bytes()
    assert again != first
    merged = load_file(workspace / "out" / "again" / "model.safetensors")
    assert merged["encoder.layer.0.attention.self.key.weight"][0, 0] == pytest.approx(
        load_file(workspace / "out" / "merged" / "model.safetensors")["encoder.layer.0.attention.self.key.weight"][0, 0]
        + 0.125, abs=1e-6)
    stores = sorted(p.name for p in (workspace / "out" / ".supermerge-store").iterdir())
    assert len(stores) == 3 and ".locks" in stores  # two entries, no lock file in .locks
    assert list((workspace / "out" / ".supermerge-store" / ".locks").iterdir()) == []


def test_a_published_model_used_as_input_keeps_its_key_only_while_its_files_are_unchanged(
    workspace, tiny_finetuned
):
    from supermerge.orchestrator.store import model_key

    _edit_config(workspace, method="task_arithmetic", parameters={"lam": 0.5})
    assert main(["merge", str(workspace / "config.yaml")]) == 0
    merged = workspace / "out" / "merged"
    recorded = json.loads((merged / "supermerge.json").read_text())["store_key"]
    assert model_key(merged) == recorded
    weights = merged / "model.safetensors"
    st = weights.stat()
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.unlink()  # a hard link into the store: write a new file, as a user editing it would
    weights.write_bytes(bytes(blob))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_key(merged) != recorded


# --- property: finite in, finite out, or refused with nothing written -----------------------------------

FP32_MAX = 3.4028234663852886e38


def _contents(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``root``: files with size and mtime, folders as None (a folder made and removed
    again changes its parent's mtime, not what is there)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None for p in root.rglob("*")}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(
    method=st.sampled_from(["task_arithmetic", "ties", "dare_ta", "average"]),
    lam=st.one_of(st.floats(-4, 4), st.sampled_from([1e38, -3e38, 3.4e38, 1e39]),
                  st.floats(allow_nan=False, allow_infinity=False)),
    value=st.one_of(st.floats(-1, 1), st.sampled_from([1e20, -1e38, 3e38]),
                    st.floats(-FP32_MAX, FP32_MAX, allow_nan=False, allow_infinity=False)),
    where=st.integers(0, 1023),
)
def test_random_finite_inputs_publish_a_finite_model_or_are_refused_writing_nothing(
    tmp_path_factory, tiny_base_dir, tiny_finetuned, method, lam, value, where
):
    ws = tmp_path_factory.mktemp("property")
    models = []
    for name in ("alpha", "beta"):
        copy = ws / name
        shutil.copytree(tiny_finetuned[name], copy)
        tensors = load_file(copy / "model.safetensors")
        tensors[KEY].view(-1)[where] = value  # finite in fp32, at the same place in both models
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
        models.append({"name": name, "path": str(copy)})
    params = {"task_arithmetic": {"lam": lam}, "ties": {"lam": lam, "density": 0.2},
              "dare_ta": {"lam": lam, "p": 0.5}, "average": {}}[method]
    (ws / "config.yaml").write_text(yaml.safe_dump({
        "base": str(tiny_base_dir), "output": str(ws / "out" / "merged"), "method": method,
        "parameters": params, "models": models, "device": "cpu"}))
    before = _contents(ws)
    rc = main(["merge", str(ws / "config.yaml")])
    event(f"rc {rc}")
    if rc == 0:
        merged = ws / "out" / "merged"
        for f in [merged / "model.safetensors", *sorted((merged / "heads").glob("*.safetensors"))]:
            assert all(torch.isfinite(t).all() for t in load_file(f).values()), f
    else:
        assert rc == 2
        assert _contents(ws) == before, "a refused run left something behind"


@pytest.mark.parametrize(("method", "params", "expected"), [
    ("wudi", {"solver": "adam", "alpha": [1.0, 2]}, []),
    ("wudi", {"solver": 3}, ["parameters.solver must be a string, got 3"]),
    ("tsv", {"alpha": 1e40}, ["parameters.alpha must be finite in float32 (|x| <= 3.4e+38), where it is applied; "
                              "got 1e+40"]),
    ("supermerge", {"transform": "sigmoid", "steps": True},
     ["parameters.transform must be one of tanh, identity, clamp01, got 'sigmoid'",
      "parameters.steps must be an integer, got True"]),
    ("supermerge", {"lr": [0.1, 0.2]}, ["parameters.lr takes one value (supermerge trains its merge weights; it "
                                        "searches no grid), got [0.1, 0.2]"]),
])
def test_parameter_problems_are_all_reported_by_name(method, params, expected):
    from supermerge.merge_core.params import parameter_problems

    assert parameter_problems(method, params) == expected

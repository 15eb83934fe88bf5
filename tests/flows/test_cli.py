"""The command line: a real merge from YAML, evaluation, help, and one clear line per bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file, save_file

from flows.cli import main
from merge_core.data import save_task_data
from tests.orchestrator.families import FAMILIES, NAMES, config_dict, one_thread
from tests.tiny import TINY_VOCAB, make_finetuned, make_task_data

TASKS = ("alpha", "beta")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tiny_finetuned(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two fine-tunes these tests merge, made as tests/conftest.py makes them but on one thread
    (see one_thread: 4x faster on the shared test machine)."""
    root = tmp_path_factory.mktemp("cli-ft")
    with one_thread():
        return {t: make_finetuned(tiny_base_dir, t, root / t, seed=i) for i, t in enumerate(TASKS)}


def _jsonl(data, path: Path) -> Path:
    """The same examples as text, so the JSONL + tokenizer path is exercised too."""
    rows = []
    for ids, label in zip(data.inputs["input_ids"].tolist(), data.labels.tolist(), strict=True):
        rows.append(json.dumps({"text": " ".join(TINY_VOCAB[i] for i in ids[1:-1]), "label": label}))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture()
def workspace(tmp_path, tiny_base_dir, tiny_finetuned) -> Path:
    """A config dir laid out as a user would: base, two fine-tunes, val/test data, config.yaml."""
    (tmp_path / "data").mkdir()
    models = []
    for i, t in enumerate(TASKS):
        val = make_task_data(t, 32, seed=40 + i)
        test = make_task_data(t, 128, seed=50 + i)
        save_task_data(val, tmp_path / "data" / f"{t}.val.safetensors")
        _jsonl(test, tmp_path / "data" / f"{t}.test.jsonl")
        models.append({"name": t, "path": str(tiny_finetuned[t]), "validation": f"data/{t}.val.safetensors",
                       "test": f"data/{t}.test.jsonl"})
    config = {"base": str(tiny_base_dir), "output": "out/merged", "method": "supermerge",
              "parameters": {"steps": 10, "lr": 0.05}, "models": models, "device": "cpu"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def _edit_config(ws: Path, **changes) -> Path:
    cfg = yaml.safe_load((ws / "config.yaml").read_text())
    cfg.update(changes)
    (ws / "config.yaml").write_text(yaml.safe_dump(cfg))
    return ws / "config.yaml"


def test_help_explains_commands_and_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("merge", "evaluate", "methods", "demo", "SuperMerge", "validation:"):
        assert word in out


def test_methods_lists_every_registered_method(capsys):
    from merge_core.methods.registry import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS) and "arxiv.org" in out


def test_merge_then_evaluate_end_to_end(workspace, capsys):
    assert main(["merge", str(workspace / "config.yaml")]) == 0
    out = capsys.readouterr().out
    merged = workspace / "out" / "merged"
    assert f"-> {merged}" in out and "test accuracy" in out
    record = json.loads((merged / "supermerge.json").read_text())
    assert record["config"]["method"] == "supermerge" and set(record["test_accuracy"]) == set(TASKS)
    assert (merged / "merge_weights.safetensors").is_file()

    assert main(["merge", str(workspace / "config.yaml"), "--method", "ties",
                 "--output", str(workspace / "out" / "ties")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(workspace / "config.yaml"), str(merged), str(workspace / "out" / "ties")]) == 0
    table = capsys.readouterr().out
    assert "| method | alpha | beta | avg acc | avg rank | normalised |" in table
    assert "*pretrained*" in table and "*individual*" in table and "| merged |" in table and "| ties |" in table


def test_existing_output_is_refused_then_replaced_with_overwrite(workspace, capsys):
    (workspace / "out" / "merged").mkdir(parents=True)
    (workspace / "out" / "merged" / "keep.txt").write_text("x")
    assert main(["merge", str(workspace / "config.yaml")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (workspace / "out" / "merged" / "keep.txt").is_file()
    assert main(["merge", str(workspace / "config.yaml"), "--overwrite"]) == 0
    assert not (workspace / "out" / "merged" / "keep.txt").exists()


def _bad_truncated(ws: Path, ft: dict[str, Path]) -> str:
    bad = ws / "truncated"
    shutil.copytree(ft["alpha"], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    _set_model_path(ws, "alpha", bad)
    return "truncated"


def _bad_nan(ws: Path, ft: dict[str, Path]) -> str:
    bad = ws / "nan"
    shutil.copytree(ft["alpha"], bad)
    t = load_file(bad / "model.safetensors")
    t["bert.encoder.layer.0.attention.self.key.weight"][1, 1] = float("inf")
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    _set_model_path(ws, "alpha", bad)
    return "attention.self.key.weight' holds NaN or Inf"


def _bad_shape(ws: Path, ft: dict[str, Path]) -> str:
    from transformers import BertForSequenceClassification

    from tests.tiny import tiny_config

    BertForSequenceClassification(tiny_config(hidden_size=16, intermediate_size=32)).save_pretrained(ws / "small")
    _set_model_path(ws, "alpha", ws / "small")
    return "has shape"


def _set_model_path(ws: Path, name: str, path: Path) -> None:
    cfg = yaml.safe_load((ws / "config.yaml").read_text())
    for m in cfg["models"]:
        if m["name"] == name:
            m["path"] = str(path)
    (ws / "config.yaml").write_text(yaml.safe_dump(cfg))


def _bad_k1(ws: Path, ft) -> str:
    cfg = yaml.safe_load((ws / "config.yaml").read_text())
    _edit_config(ws, models=cfg["models"][:1])
    return "at least 2 models"


def _bad_empty_val(ws: Path, ft) -> str:
    (ws / "data" / "empty.jsonl").write_text("\n")
    cfg = yaml.safe_load((ws / "config.yaml").read_text())
    cfg["models"][1]["validation"] = "data/empty.jsonl"
    (ws / "config.yaml").write_text(yaml.safe_dump(cfg))
    return "holds no examples"


def _bad_method(ws: Path, ft) -> str:
    _edit_config(ws, method="frankenmerge")
    return "unknown method 'frankenmerge'"


def _bad_yaml(ws: Path, ft) -> str:
    (ws / "config.yaml").write_text("base: [unclosed\nmodels: {")
    return "is not valid YAML"


def _bad_missing_file(ws: Path, ft) -> str:
    _set_model_path(ws, "beta", ws / "gone")
    return "models[beta].path"


def _bad_param(ws: Path, ft) -> str:
    _edit_config(ws, parameters={"stepz": 3})
    return "no parameter(s) ['stepz']"


@pytest.mark.parametrize(
    "make_bad",
    [_bad_truncated, _bad_nan, _bad_shape, _bad_k1, _bad_empty_val, _bad_method, _bad_yaml,
     _bad_missing_file, _bad_param],
)
def test_bad_input_gives_one_clear_error_and_writes_nothing(workspace, tiny_finetuned, capsys, make_bad):
    expected = make_bad(workspace, tiny_finetuned)
    assert main(["merge", str(workspace / "config.yaml")]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "supermerge: error:" in line]
    assert len(errors) == 1, captured.err
    assert expected in captured.err
    assert "Traceback" not in captured.err
    assert not (workspace / "out").exists()


# --- planning and hierarchical merges (family_models: tests/flows/conftest.py, built by
# tests/orchestrator/families.py) ---------------------------------------------------------------------


def _family_config(tmp_path: Path, tiny_base_dir: Path, family_models, names=None, **extra) -> Path:
    raw = config_dict(tiny_base_dir, family_models, Path("out/merged"), names, **extra)
    raw["output"] = "out/merged"  # relative to the config file, as a user writes it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "config.yaml"


def test_plan_prints_the_tree_each_nodes_memory_and_device_and_the_fan_in(tmp_path, tiny_base_dir, family_models,
                                                                          capsys):
    config = _family_config(tmp_path, tiny_base_dir, family_models)
    assert main(["plan", str(config), "--max-fan-in", "2", "--memory-budget", "64GB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("8 models -> 7 merge(s), fan-in 2")
    assert "budget per node:" in out and "memory budget 64GB" in out
    lines = out.splitlines()
    for family in FAMILIES:  # each family's two models hang under the same merge node
        rows = [i for i, line in enumerate(lines) if line.rstrip().endswith(tuple(f"── {m}" for m in family))]
        assert len(rows) == 2 and rows[1] == rows[0] + 1 and "[2 tasks] cpu, predicted" in lines[rows[0] - 1]
    assert len([line for line in lines if line.startswith("| merge-")]) == 7
    assert not (tmp_path / "out").exists()

    assert main(["plan", str(config), "--flat"]) == 0
    flat = capsys.readouterr().out
    assert flat.startswith("8 models -> 1 merge(s), fan-in 8 (flat merge: tree.flat)")
    assert all(f"── {n}" in flat for n in NAMES)


def test_hierarchical_merge_end_to_end(tmp_path, tiny_base_dir, family_models, capsys):
    config = _family_config(tmp_path, tiny_base_dir, family_models, ["pa", "pb", "qa", "qb"])
    assert main(["merge", str(config), "--max-fan-in", "2", "--memory-budget", "64GB"]) == 0
    out = capsys.readouterr().out
    merged = tmp_path / "out" / "merged"
    assert f"-> {merged}" in out and "tree: 3 merge(s), fan-in 2, depth 2" in out
    assert "validation accuracy: pa " in out
    report = json.loads((merged / "merge_report.json").read_text())
    assert [len(n["tasks"]) for n in report["plan"]["nodes"]] == [2, 2, 4]
    assert all(n["measured_peak_bytes"] > 0 and n["predicted_peak_bytes"] > 0 for n in report["nodes"])
    record = json.loads((merged / "supermerge.json").read_text())
    assert record["config"]["tree"] == {"flat": False, "groups": None, "max_fan_in": 2, "memory_budget": "64GB"}
    assert sorted(record["tasks"]) == ["pa", "pb", "qa", "qb"]

    # run again into another output: every node comes from the store, nothing is merged again
    assert main(["merge", str(config), "--max-fan-in", "2", "--output", str(tmp_path / "out" / "again")]) == 0
    assert "3 reused from the store" in capsys.readouterr().out
    again = tmp_path / "out" / "again" / "model.safetensors"
    assert again.read_bytes() == (merged / "model.safetensors").read_bytes()


def test_a_budget_too_small_for_fan_in_two_is_one_clear_error_and_writes_nothing(
    tmp_path, tiny_base_dir, family_models, capsys
):
    config = _family_config(tmp_path, tiny_base_dir, family_models, ["pa", "pb", "qa", "qb"])
    # 16 MiB above what this process holds: less than any node of the tiny models needs (~35 MB); if
    # planning itself grows the process past it, that is refused as clearly
    budget = str(psutil.Process().memory_info().rss + 16 * 2**20)
    assert main(["merge", str(config), "--memory-budget", budget]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "supermerge: error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "even fan-in 2 does not fit" in lines[0] or "this process already uses" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["--max-fan-in", "1"], "tree.max_fan_in: Input should be greater than or equal to 2"),
     (["--memory-budget", "lots"], "memory budget 'lots' is not a size")],
)
def test_bad_tree_options_are_one_clear_error(tmp_path, tiny_base_dir, family_models, capsys, args, expected):
    config = _family_config(tmp_path, tiny_base_dir, family_models, ["pa", "pb"])
    assert main(["plan", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "supermerge: error:" in line]) == 1 and expected in err


def test_flat_and_max_fan_in_exclude_each_other(tmp_path, tiny_base_dir, family_models, capsys):
    config = _family_config(tmp_path, tiny_base_dir, family_models, ["pa", "pb"])
    with pytest.raises(SystemExit) as e:
        main(["merge", str(config), "--flat", "--max-fan-in", "2"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err

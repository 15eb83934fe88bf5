"""The command line: a real merge from YAML, evaluation, help, and one clear line per bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from flows.cli import main
from merge_core.data import save_task_data
from tests.tiny import TINY_VOCAB, make_task_data

TASKS = ("alpha", "beta")


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

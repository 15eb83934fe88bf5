"""The command line: a real merge from YAML, evaluation, help, and one clear line per bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from supermerge.flows.cli import main
from supermerge.merge_core.data import save_task_data
from tests.errors_doc import check_row, documented_cases, generic
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
    from supermerge.merge_core.methods.registry import METHODS

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


def test_string_labels_merge_and_score_like_the_class_ids(workspace, tiny_finetuned, capsys):
    names = {"alpha": ["absent", "present"], "beta": ["no", "yes"]}
    for i, t in enumerate(TASKS):
        _named_copy(workspace, tiny_finetuned, t, names[t])
        for split, data in (("validation", make_task_data(t, 32, seed=40 + i)), ("test", make_task_data(t, 64, seed=50 + i))):
            ids = _jsonl(data, workspace / "data" / f"{t}.{split}.ids.jsonl")
            rows = [json.loads(line) for line in ids.read_text().splitlines()]
            (workspace / "data" / f"{t}.{split}.names.jsonl").write_text(
                "".join(json.dumps({**r, "label": names[t][r["label"]]}) + "\n" for r in rows))
    records = {}
    for labels in ("ids", "names"):  # each with its own store, so the second merge is not the first one cached
        for t in TASKS:
            for split in ("validation", "test"):
                _set_model_field(workspace, t, split, f"data/{t}.{split}.{labels}.jsonl")
        _edit_config(workspace, output=f"out-{labels}/merged")
        assert main(["merge", str(workspace / "config.yaml")]) == 0
        capsys.readouterr()
        records[labels] = json.loads((workspace / f"out-{labels}" / "merged" / "supermerge.json").read_text())
    assert records["names"]["test_accuracy"] == records["ids"]["test_accuracy"]
    assert records["names"]["val_accuracy"] == records["ids"]["val_accuracy"]
    learned = [load_file(workspace / f"out-{labels}" / "merged" / "merge_weights.safetensors") for labels in records]
    assert learned[0].keys() == learned[1].keys() and all(torch.equal(learned[0][k], learned[1][k]) for k in learned[0])
    assert records["names"]["labels"] == {t: {str(i): n for i, n in enumerate(names[t])} for t in TASKS}


def test_plan_says_where_max_length_came_from(workspace, tiny_finetuned, capsys):
    from supermerge.merge_core.max_length import write_finetune_record

    assert main(["plan", str(workspace / "config.yaml")]) == 0
    assert "max_length 64 (default)" in capsys.readouterr().out
    for t in TASKS:
        copy = workspace / f"{t}-recorded"
        shutil.copytree(tiny_finetuned[t], copy)
        write_finetune_record(copy, 12)
        _set_model_path(workspace, t, copy)
    assert main(["plan", str(workspace / "config.yaml")]) == 0
    assert "max_length 12 (from the fine-tunes' supermerge-finetune.json)" in capsys.readouterr().out
    _edit_config(workspace, max_length=16)
    assert main(["plan", str(workspace / "config.yaml")]) == 0
    assert "max_length 16 (set in the config)" in capsys.readouterr().out


def test_existing_output_is_refused_then_replaced_with_overwrite(workspace, capsys):
    (workspace / "out" / "merged").mkdir(parents=True)
    (workspace / "out" / "merged" / "keep.txt").write_text("x")
    assert main(["merge", str(workspace / "config.yaml")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (workspace / "out" / "merged" / "keep.txt").is_file()
    assert main(["merge", str(workspace / "config.yaml"), "--overwrite"]) == 0
    assert not (workspace / "out" / "merged" / "keep.txt").exists()


# --- bad input: one clear error before any work, nothing written (docs/errors.md lists every case) ----


class _Pickled:
    """A pickle that runs code when loaded: it would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (self.path.touch, ())


def _set_model_path(ws: Path, name: str, path: Path) -> None:
    cfg = yaml.safe_load((ws / "config.yaml").read_text())
    for m in cfg["models"]:
        if m["name"] == name:
            m["path"] = str(path)
    (ws / "config.yaml").write_text(yaml.safe_dump(cfg))


def _set_model_field(ws: Path, name: str, field: str, value: object) -> None:
    cfg = yaml.safe_load((ws / "config.yaml").read_text())
    for m in cfg["models"]:
        if m["name"] == name:
            if value is None:
                m.pop(field, None)
            else:
                m[field] = value
    (ws / "config.yaml").write_text(yaml.safe_dump(cfg))


def _copy_model(ws: Path, ft: dict[str, Path], name: str) -> Path:
    """A copy of the alpha fine-tune to damage, set as alpha's path in the config."""
    copy = ws / name
    shutil.copytree(ft["alpha"], copy)
    _set_model_path(ws, "alpha", copy)
    return copy


def _edit_tensors(ws: Path, ft: dict[str, Path], name: str, edit) -> None:
    copy = _copy_model(ws, ft, name)
    tensors = load_file(copy / "model.safetensors")
    edit(tensors)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})


def _missing_file(ws, ft, mp):
    _set_model_path(ws, "beta", ws / "gone")
    return "models[beta].path", []


def _not_a_model(ws, ft, mp):
    (ws / "empty-model").mkdir()
    (ws / "empty-model" / "notes.txt").write_text("weights to follow")
    _set_model_path(ws, "beta", ws / "empty-model")
    return "holds no model weights", []


def _unreadable_data(ws, ft, mp):
    (ws / "data" / "alpha.val.safetensors").write_bytes(b"\x00\x01 not a safetensors file \xff" * 4)
    return "is not a readable safetensors file", []


def _truncated(ws, ft, mp):
    f = _copy_model(ws, ft, "truncated") / "model.safetensors"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    return "truncated", []


def _corrupted_header(ws, ft, mp):
    f = _copy_model(ws, ft, "corrupted") / "model.safetensors"
    blob = bytearray(f.read_bytes())
    blob[8:40] = b"#" * 32
    f.write_bytes(bytes(blob))
    return "is not a readable safetensors file", []


def _pickled_bin(ws, ft, mp):
    folder = ws / "pickled"
    folder.mkdir()
    torch.save({"w": torch.zeros(1), "x": _Pickled(ws / "pwned")}, folder / "pytorch_model.bin")
    _set_model_path(ws, "alpha", folder)
    return "never unpickles", []


def _tensor_missing(ws, ft, mp):
    _edit_tensors(ws, ft, "missing-tensor", lambda t: t.pop("bert.encoder.layer.1.output.dense.bias"))
    return "tensor 'encoder.layer.1.output.dense.bias' of the base is missing", []


def _tensor_extra(ws, ft, mp):
    _edit_tensors(ws, ft, "extra-tensor", lambda t: t.update({"bert.encoder.extra.weight": torch.zeros(2)}))
    return "tensor 'bert.encoder.extra.weight' is not in the base", []


def _other_base(ws, ft, mp):
    from transformers import BertForSequenceClassification

    from tests.tiny import tiny_config

    BertForSequenceClassification(tiny_config(hidden_size=16, intermediate_size=32)).save_pretrained(ws / "small")
    _set_model_path(ws, "alpha", ws / "small")
    return "has shape", []


def _adapter_other_base(ws, ft, mp):
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    from tests.tiny import tiny_config

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(hidden_size=16, intermediate_size=32))
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    get_peft_model(model, lora).save_pretrained(ws / "small-lora")
    _set_model_path(ws, "alpha", ws / "small-lora")
    return "was the adapter made for another model?", []


def _dtype(ws, ft, mp):
    name = "bert.encoder.layer.0.output.dense.weight"
    _edit_tensors(ws, ft, "half", lambda t: t.update({name: t[name].half()}))
    return "save the fine-tuned model in the base's dtype", []


def _nan(ws, ft, mp):
    def poison(t):
        t["bert.encoder.layer.0.attention.self.key.weight"][1, 1] = float("inf")

    _edit_tensors(ws, ft, "nan", poison)
    return "attention.self.key.weight' holds NaN or Inf", []


def _duplicate_names(ws, ft, mp):
    _set_model_field(ws, "beta", "name", "alpha")
    return "model names must be unique; repeated: ['alpha']", []


def _k1(ws, ft, mp):
    cfg = yaml.safe_load((ws / "config.yaml").read_text())
    _edit_config(ws, models=cfg["models"][:1])
    return "at least 2 models", []


def _no_validation(ws, ft, mp):
    _set_model_field(ws, "beta", "validation", None)
    return "have no 'validation:' file", []


def _empty_validation(ws, ft, mp):
    (ws / "data" / "empty.jsonl").write_text("\n")
    _set_model_field(ws, "beta", "validation", "data/empty.jsonl")
    return "holds no examples", []


def _unlabelled_validation(ws, ft, mp):
    (ws / "data" / "unlabelled.jsonl").write_text('{"text": "w1 w2 w3"}\n{"text": "w4 w5"}\n')
    _set_model_field(ws, "beta", "validation", "data/unlabelled.jsonl")
    return "and a 'label'", []


def _named_copy(ws: Path, ft: dict[str, Path], task: str, names: list[str]) -> Path:
    """A copy of ``task``'s fine-tune whose config.json names its classes, set as its path in the config."""
    copy = ws / f"{task}-named"
    shutil.copytree(ft[task], copy)
    config = json.loads((copy / "config.json").read_text())
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    (copy / "config.json").write_text(json.dumps(config))
    _set_model_path(ws, task, copy)
    return copy


def _label_name_unknown(ws, ft, mp):
    _named_copy(ws, ft, "alpha", ["absent", "present"])
    (ws / "data" / "named.jsonl").write_text('{"text": "w1 w2", "label": "present"}\n{"text": "w3", "label": "maybe"}\n')
    _set_model_field(ws, "alpha", "validation", "data/named.jsonl")
    return "label 'maybe' is not a class of the task", []


def _label_name_without_names(ws, ft, mp):
    (ws / "data" / "named.jsonl").write_text('{"text": "w1 w2", "label": "present"}\n')
    _set_model_field(ws, "alpha", "validation", "data/named.jsonl")
    return "add the names to the fine-tune's config.json", []


def _max_length_records_differ(ws, ft, mp):
    from supermerge.merge_core.max_length import write_finetune_record

    write_finetune_record(_copy_model(ws, ft, "recorded"), 32)
    return "set max_length in the config", []


def _method(ws, ft, mp):
    _edit_config(ws, method="frankenmerge")
    return "unknown method 'frankenmerge'", []


def _param(ws, ft, mp):
    _edit_config(ws, parameters={"stepz": 3})
    return "no parameter(s) ['stepz']", []


def _yaml(ws, ft, mp):
    (ws / "config.yaml").write_text("base: [unclosed\nmodels: {")
    return "is not valid YAML", []


def _groups_unknown_model(ws, ft, mp):
    _edit_config(ws, tree={"groups": [["alpha", "gamma"]]})
    return "unknown model(s) ['gamma']", []


def _budget_below_process(ws, ft, mp):
    return "this process already uses", ["--memory-budget", "1kB"]


def _budget_fits_no_plan(ws, ft, mp):
    from supermerge.orchestrator.hardware import MemoryInventory

    # the machine as the planner sees it, fixed: a terabyte free and a process holding nothing, so the
    # node's prediction (tens of MB) meets a 20 MB budget on every machine
    empty = MemoryInventory(ram_available_bytes=10**12, ram_total_bytes=10**12, process_bytes=0)
    mp.setattr("supermerge.orchestrator.plan.read_inventory", lambda: empty)
    return "no merge plan fits", ["--memory-budget", "20MB"]


def _output_exists(ws, ft, mp):
    (ws / "out" / "merged").mkdir(parents=True)
    (ws / "out" / "merged" / "keep.txt").write_text("x")
    return "already exists", []


def _output_inside_input(ws, ft, mp):
    return "overlaps the input(s) base", ["--output", str(Path(_base_of(ws)) / "merged")]


def _output_holds_input(ws, ft, mp):
    return "overlaps the input(s) models[alpha].validation", ["--output", str(ws / "data")]


def _base_of(ws: Path) -> str:
    return yaml.safe_load((ws / "config.yaml").read_text())["base"]


BAD_INPUTS = {
    "missing-file": ("a model path that does not exist", _missing_file),
    "not-a-model": ("a model folder without weights", _not_a_model),
    "unreadable-data": ("validation data that is not a readable file", _unreadable_data),
    "truncated": ("a truncated safetensors file", _truncated),
    "corrupted-header": ("a safetensors file with a corrupted header", _corrupted_header),
    "pickled-code": ("a pytorch_model.bin whose pickle runs code", _pickled_bin),
    "tensor-missing": ("a fine-tuned model lacking a tensor of the base", _tensor_missing),
    "tensor-extra": ("a fine-tuned model with a tensor the base lacks", _tensor_extra),
    "other-base": ("a fine-tuned model of another base (shapes differ)", _other_base),
    "adapter-other-base": ("a LoRA adapter made for another base", _adapter_other_base),
    "dtype-mismatch": ("a tensor in another dtype than the base's", _dtype),
    "nan-inf": ("a tensor holding NaN or Inf", _nan),
    "duplicate-names": ("two models with the same task name", _duplicate_names),
    "k-1": ("one model (k=1)", _k1),
    "no-validation": ("a supervised method, a model without validation data", _no_validation),
    "empty-validation": ("empty validation data", _empty_validation),
    "unlabelled-validation": ("validation data without labels", _unlabelled_validation),
    "label-name-unknown": ("a label name the fine-tune's id2label lacks", _label_name_unknown),
    "label-name-without-names": ("a label name, a fine-tune without id2label names", _label_name_without_names),
    "max-length-records-differ": ("one fine-tune records a training length, the other none",
                                  _max_length_records_differ),
    "unknown-method": ("an unknown method", _method),
    "unknown-parameter": ("an unknown method parameter", _param),
    "invalid-yaml": ("a config that is not valid YAML", _yaml),
    "groups-unknown-model": ("hand-given tree groups naming an unknown model", _groups_unknown_model),
    "budget-below-process": ("a memory budget below what the process holds", _budget_below_process),
    "budget-fits-no-plan": ("a memory budget no merge plan fits", _budget_fits_no_plan),
    "output-exists": ("an output that exists, without --overwrite", _output_exists),
    "output-inside-input": ("an output inside an input model's folder", _output_inside_input),
    "output-holds-input": ("an output folder that holds an input", _output_holds_input),
}


def _files(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots``, with its size and modification time."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.stat()
            out[str(p)] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_error_and_writes_nothing(workspace, tiny_base_dir, tiny_finetuned, capsys,
                                                            monkeypatch, case):
    from supermerge.flows.cli import build_parser, cmd_merge, options_from_args
    from supermerge.merge_core.errors import SupermergeError

    what, make_bad = BAD_INPUTS[case]
    expected, options = make_bad(workspace, tiny_finetuned, monkeypatch)
    argv = ["merge", str(workspace / "config.yaml"), *options]
    models = tiny_finetuned["alpha"].parent
    before = _files(workspace, tiny_base_dir, models)

    assert main(argv) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "supermerge: error:" in line]
    assert len(errors) == 1, captured.err
    assert expected in captured.err and "Traceback" not in captured.err

    args = build_parser().parse_args(argv)  # the same command, to see the error the CLI printed
    with pytest.raises(SupermergeError) as refused:
        cmd_merge(args.config, options_from_args(args))
    capsys.readouterr()
    assert generic(f"supermerge: error: {refused.value}".splitlines()[0], {}) == generic(errors[0], {})
    assert _files(workspace, tiny_base_dir, models) == before, "something was written"
    check_row(case, what, refused.value, {"<workspace>": workspace, "<base>": tiny_base_dir, "<models>": models})


RUNNING = ["data-changed-since-plan", "node-out-of-memory", "damaged-store-entry", "over-prediction"]
"""The doc's other rows, each checked by the test in tests/orchestrator that provokes it."""


def test_the_errors_doc_lists_every_case_in_order_and_nothing_else():
    from tests.flows.test_faults import FAULTS, FAULTS_RUNNING, FAULTS_WARNINGS

    assert documented_cases() == [*BAD_INPUTS, *FAULTS, *RUNNING[:2], *FAULTS_RUNNING, *RUNNING[2:], *FAULTS_WARNINGS]


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
    assert record["config"]["tree"] == {"flat": False, "flat_compressed": True, "groups": None, "max_fan_in": 2,
                                        "memory_budget": "64GB", "shape": "balanced"}
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

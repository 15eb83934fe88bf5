"""``register``: a task model is checked against the base and its data before it is listed; the
registry file is replaced whole; the event goes out when a Prefect API is configured."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from transformers import BertForSequenceClassification

from supermerge.flows.cli import main
from supermerge.flows.registry import EVENT, RESOURCE_PREFIX, register, register_command
from supermerge.merge_core.config import parse_config
from supermerge.merge_core.errors import ConfigError, DataError, TaskVectorError
from supermerge.merge_core.task_registry import REGISTRY_FILE, read_registry
from tests.orchestrator.families import FamilyModels
from tests.tiny import tiny_config


def _register(models: FamilyModels, task: str, registry: Path, **kwargs: object):
    return register(models[task]["path"], task, models[task]["validation"], registry, **kwargs)


def test_registered_models_are_listed_in_order_and_the_file_is_replaced_whole(
    tiny_base_dir: Path, family_models: FamilyModels, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    first = _register(family_models, "pa", registry, base=tiny_base_dir)
    _register(family_models, "qb", registry)  # the base is kept from the first registration
    listed = read_registry(registry)
    assert listed.base == tiny_base_dir.resolve() and listed.names() == ["pa", "qb"]
    assert listed.models[1] == {"name": "qb", "path": str(Path(family_models["qb"]["path"]).resolve()),
                                "validation": str(Path(family_models["qb"]["validation"]).resolve())}
    assert first.registry_file == registry.resolve() / REGISTRY_FILE
    assert sorted(p.name for p in registry.iterdir()) == [REGISTRY_FILE]  # no temporary file left

    with pytest.raises(ConfigError, match="already registered"):
        _register(family_models, "pa", registry)
    _register(family_models, "pa", registry, replace=True)
    assert read_registry(registry).names() == ["pa", "qb"]


def test_a_model_that_would_break_the_merge_is_refused_and_nothing_is_listed(
    tiny_base_dir: Path, family_models: FamilyModels, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    val = family_models["pa"]["validation"]
    with pytest.raises(ConfigError, match="give the base"):
        _register(family_models, "pa", registry)

    other = tmp_path / "other-shape"
    BertForSequenceClassification(tiny_config(hidden_size=16, intermediate_size=32)).save_pretrained(other)
    with pytest.raises(TaskVectorError, match="shape"):
        register(other, "wide", val, registry, base=tiny_base_dir)
    with pytest.raises(DataError, match="no task head"):
        register(tiny_base_dir, "headless", val, registry, base=tiny_base_dir)
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text(json.dumps({"text": "w1 w2"}) + "\n")
    with pytest.raises(DataError, match="label"):
        register(family_models["pa"]["path"], "pa", unlabelled, registry, base=tiny_base_dir)
    with pytest.raises(ConfigError, match="does not exist"):
        register(tmp_path / "nowhere", "pa", val, registry, base=tiny_base_dir)
    with pytest.raises(ConfigError, match="name"):
        register(family_models["pa"]["path"], "bad name!", val, registry, base=tiny_base_dir)
    assert not (registry / REGISTRY_FILE).exists()

    _register(family_models, "pa", registry, base=tiny_base_dir)
    with pytest.raises(ConfigError, match="holds models of the base"):
        _register(family_models, "pb", registry, base=tmp_path)


def test_a_config_naming_the_registry_merges_its_models_after_its_own(
    tiny_base_dir: Path, family_models: FamilyModels, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    raw = {"base": str(tiny_base_dir), "output": str(tmp_path / "out"), "registry": "registry",
           "models": [{"name": n, "path": str(family_models[n]["path"])} for n in ("pa", "pb")]}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw))
    from supermerge.merge_core.config import load_config

    assert [m.name for m in load_config(tmp_path / "merge.yaml").models] == ["pa", "pb"]  # empty registry
    _register(family_models, "qa", registry, base=tiny_base_dir)
    config = load_config(tmp_path / "merge.yaml")
    assert [m.name for m in config.models] == ["pa", "pb", "qa"] and config.registry == registry
    # validating the resolved config again (as the CLI's overrides do) does not list qa twice
    assert [m.name for m in parse_config(config.resolved()).models] == ["pa", "pb", "qa"]

    with pytest.raises(ConfigError, match="registry folder .* does not exist"):
        parse_config({**raw, "registry": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="holds models of the base"):
        parse_config({**raw, "registry": str(registry), "base": str(family_models["pa"]["path"])})


def test_the_event_goes_out_only_when_a_prefect_api_is_configured(
    prefect_api: None, tiny_base_dir: Path, family_models: FamilyModels, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    done = _register(family_models, "pa", tmp_path / "registry", base=tiny_base_dir)
    assert done.event_id is not None
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert _register(family_models, "pb", tmp_path / "registry").event_id is None

    m = family_models["qa"]
    code = main(["register", str(m["path"]), "--task", "qa", "--val", str(m["validation"]),  # the CLI's own way
                 "--registry", str(tmp_path / "registry")])
    assert code == 0 and f"event {EVENT}" in capsys.readouterr().out
    assert register_command([str(m["path"]), "--task", "qa", "--val", str(m["validation"]),
                             "--registry", str(tmp_path / "registry")]) == 2
    assert "already registered" in capsys.readouterr().err
    assert _server_event(done.event_id)["resource"]["prefect.resource.id"] == f"{RESOURCE_PREFIX}pa"


def _server_event(event_id: str, timeout: float = 20.0) -> dict:
    """The event as the server stored it (it persists events in batches, a second or two later)."""
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            body = {"filter": {"event": {"name": [EVENT]}, "any_resource": {"id_prefix": [RESOURCE_PREFIX]}},
                    "limit": 50}
            found = [e for e in client.request("POST", "/events/filter", json=body).json()["events"]
                     if e["id"] == event_id]
            if found or time.monotonic() > deadline:
                assert found, f"event {event_id} never reached the server"
                return found[0]
            time.sleep(0.5)


def _damaged_copy(models: FamilyModels, task: str, tmp_path: Path, edit) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / f"{task}-damaged"
    shutil.copytree(models[task]["path"], copy)
    tensors = load_file(copy / "model.safetensors")
    edit(tensors)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_register_refuses_what_the_next_merge_would_refuse(
    tiny_base_dir: Path, family_models: FamilyModels, tmp_path: Path
) -> None:
    """The merge's own checks (supermerge.merge_core.preflight): a NaN bias, labels outside the head's classes,
    a null text, another architecture's config.json; nothing is listed."""
    registry = tmp_path / "registry"
    val = family_models["pa"]["validation"]

    def nan_bias(t):
        t["bert.encoder.layer.1.output.dense.bias"][0] = float("nan")

    with pytest.raises(TaskVectorError, match="'bert.encoder.layer.1.output.dense.bias' holds NaN or Inf"):
        register(_damaged_copy(family_models, "pa", tmp_path, nan_bias), "pa", val, registry, base=tiny_base_dir)
    out_of_range = tmp_path / "seven.jsonl"
    out_of_range.write_text(json.dumps({"text": "w1 w2", "label": 7}) + "\n")
    with pytest.raises(DataError, match="label 7 .* which has 2 classes"):
        register(family_models["pa"]["path"], "pa", out_of_range, registry, base=tiny_base_dir)
    with pytest.raises(DataError, match="label 7"):
        register(family_models["pa"]["path"], "pa", val, registry, base=tiny_base_dir, test=out_of_range)
    null = tmp_path / "null.jsonl"
    null.write_text(json.dumps({"text": None, "label": 0}) + "\n")
    with pytest.raises(DataError, match="'text' is None"):
        register(family_models["pa"]["path"], "pa", null, registry, base=tiny_base_dir)
    import shutil

    relu = tmp_path / "relu"
    shutil.copytree(family_models["pa"]["path"], relu)
    cfg = json.loads((relu / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(TaskVectorError, match="differs from the base's in hidden_act"):
        register(relu, "pa", val, registry, base=tiny_base_dir)
    with pytest.raises(ConfigError, match="max_length 512 is more than the base's 64 positions"):
        register(family_models["pa"]["path"], "pa", val, registry, base=tiny_base_dir, max_length=512)
    assert not registry.exists() or not (registry / REGISTRY_FILE).exists()


def test_unregister_takes_a_model_off_and_refuses_an_unknown_name(
    tiny_base_dir: Path, family_models: FamilyModels, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from supermerge.flows.registry import unregister

    registry = tmp_path / "registry"
    _register(family_models, "pa", registry, base=tiny_base_dir)
    _register(family_models, "qa", registry)
    assert main(["unregister", "--task", "pa", "--registry", str(registry)]) == 0
    assert f"unregistered pa from {registry.resolve() / REGISTRY_FILE}" in capsys.readouterr().out
    assert read_registry(registry).names() == ["qa"] and read_registry(registry).base == tiny_base_dir.resolve()
    assert main(["unregister", "--task", "pa", "--registry", str(registry)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"supermerge: error: task 'pa' is not registered in {registry.resolve() / REGISTRY_FILE}; registered: ['qa']"
    with pytest.raises(ConfigError, match="has no registry.yaml"):
        unregister("qa", tmp_path / "elsewhere")
    assert sorted(p.name for p in registry.iterdir()) == [REGISTRY_FILE]


@pytest.mark.parametrize(("text", "expected"), [
    ("[]\n", "expected a mapping with 'base' and a list 'models' (got list)"),
    ("", "expected a mapping with 'base' and a list 'models' (got NoneType)"),
    ("base: /b\nmodels: []\nmodels: []\n", "key 'models' is given twice"),
    ("base: 3\nmodels: []\n", "'base' must be the path of the base model, got 3"),
    ("base: /b\nmodels:\n  - {name: a, path: [1]}\n", "models[0].path must be a string"),
    ("base: /b\nextra: 1\n", "unknown key(s) ['extra']"),
])
def test_a_malformed_registry_is_an_error(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / REGISTRY_FILE).write_text(text)
    with pytest.raises(ConfigError) as refused:
        read_registry(tmp_path)
    assert expected in str(refused.value)

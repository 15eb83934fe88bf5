"""``max_length``: the config's, else the training length every fine-tune records, else 64; never a
guess between fine-tunes that disagree."""

from __future__ import annotations

import json

import pytest

from supermerge.merge_core.config import parse_config
from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.finetune import FinetuneConfig, finetune_classifier
from supermerge.merge_core.max_length import FINETUNE_RECORD, recorded_max_length, resolve_max_length, write_finetune_record
from tests.tiny import make_task_data


def _models(tmp_path, lengths):
    out = {}
    for i, n in enumerate(lengths):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        if n is not None:
            write_finetune_record(folder, n)
        out[f"m{i}"] = folder
    return out


@pytest.mark.parametrize(("given", "lengths", "expected"), [
    (None, [None, None], "max_length 64 (default)"),
    (None, [], "max_length 64 (default)"),  # every path unreadable: missing_files reports them
    (None, [128, 128], f"max_length 128 (from the fine-tunes' {FINETUNE_RECORD})"),
    (32, [128, 256], "max_length 32 (set in the config)"),
    (32, [None, None], "max_length 32 (set in the config)"),
])
def test_the_config_wins_then_the_fine_tunes_agreeing_then_the_default(tmp_path, given, lengths, expected):
    assert resolve_max_length(given, _models(tmp_path, lengths)).describe() == expected


@pytest.mark.parametrize("lengths", [[128, 256], [128, None]])
def test_fine_tunes_without_one_length_are_refused_until_the_config_sets_it(tmp_path, lengths):
    said = ", ".join(f"m{i} {n if n is not None else 'none'}" for i, n in enumerate(lengths))
    with pytest.raises(ConfigError, match=f"do not record one training length \\({FINETUNE_RECORD}: {said}\\); "
                                          "set max_length in the config"):
        resolve_max_length(None, _models(tmp_path, lengths))


@pytest.mark.parametrize("text", ["not json", '{"max_length": "long"}', '{"max_length": 1}', "[128]"])
def test_a_damaged_record_names_the_file_and_the_fix(tmp_path, text):
    (tmp_path / FINETUNE_RECORD).write_text(text)
    with pytest.raises(ConfigError, match=f"{FINETUNE_RECORD}.*fix or delete it, or set max_length in the config"):
        recorded_max_length(tmp_path)


def test_a_config_without_max_length_takes_the_fine_tunes_and_keeps_where_from(tmp_path):
    models = _models(tmp_path, [48, 48])
    (tmp_path / "base").mkdir()
    raw = {"base": str(tmp_path / "base"), "output": str(tmp_path / "out"), "method": "task_arithmetic",
           "models": [{"name": n, "path": str(p)} for n, p in models.items()]}
    config = parse_config(raw)
    assert (config.max_length, config.max_length_resolved.source) == (48, "fine-tunes")
    assert config.resolved()["max_length"] == 48  # the config saved beside the output says what was used
    assert parse_config({**raw, "max_length": 16}).max_length_resolved.source == "config"
    write_finetune_record(models["m1"], 64)
    with pytest.raises(ConfigError, match="m0 48, m1 64"):
        parse_config(raw)


def test_the_fine_tune_helper_records_the_length_its_data_was_cut_to(tiny_base_dir, tmp_path):
    train = make_task_data("alpha", 8, seed=0)
    quick = FinetuneConfig(epochs=1.0, batch_size=8)
    recorded = finetune_classifier(tiny_base_dir, train, 2, tmp_path / "recorded", quick, max_length=12)
    assert recorded_max_length(recorded) == 12
    assert json.loads((recorded / FINETUNE_RECORD).read_text()) == {"max_length": 12}
    assert recorded_max_length(recorded / "model.safetensors") == 12  # a weights file: its folder's record
    plain = finetune_classifier(tiny_base_dir, train, 2, tmp_path / "plain", quick)
    assert recorded_max_length(plain) is None

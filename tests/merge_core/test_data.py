"""Batches cut their padding without changing what the model computes; JSONL labels are class ids or
the names the fine-tune's id2label gives them."""

from __future__ import annotations

import json

import pytest
import torch

from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.data import TaskData, load_task_data
from supermerge.merge_core.errors import DataError
from supermerge.merge_core.job import load_tokenizer
from supermerge.merge_core.labels import label_ids
from supermerge.merge_core.evaluate import task_scores
from supermerge.merge_core.model import FunctionalModel
from supermerge.merge_core.task_vectors import mergeable_names
from tests.tiny import make_task_data


def _right_padded(data: TaskData, lengths: list[int]) -> TaskData:
    """``data`` with row i keeping its first lengths[i] tokens and the rest set to padding (id 0)."""
    ids = data.inputs["input_ids"].clone()
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return TaskData({"input_ids": ids, "attention_mask": mask}, data.labels)


def test_trimmed_drops_only_columns_that_are_padding_everywhere():
    data = _right_padded(make_task_data("alpha", 4, seed=0, seq_len=12), [3, 7, 5, 2])
    cut = data.trimmed()
    assert cut.inputs["input_ids"].shape == (4, 7)
    assert torch.equal(cut.inputs["input_ids"], data.inputs["input_ids"][:, :7])
    assert torch.equal(cut.labels, data.labels)


def test_left_padded_and_full_rows_are_left_alone():
    data = make_task_data("alpha", 3, seed=0, seq_len=6)
    assert data.trimmed() is data
    left = TaskData({"input_ids": data.inputs["input_ids"],
                     "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1]] * 3)}, data.labels)
    assert left.trimmed().inputs["input_ids"].shape == (3, 6)


def test_batches_by_length_cover_every_row_once_and_score_like_unpadded(tiny_base_dir):
    lengths = [12, 4, 9, 4, 6, 12, 3, 5, 8, 10]
    data = _right_padded(make_task_data("alpha", 10, seed=1, seq_len=12), lengths)
    batches = list(data.batches(3, by_length=True))
    assert sorted(int(n) for b in batches for n in b.inputs["attention_mask"].sum(1)) == sorted(lengths)
    assert [b.inputs["input_ids"].shape[1] for b in batches] == [4, 8, 12, 12]
    model = FunctionalModel(tiny_base_dir)
    with open_checkpoint(tiny_base_dir) as base:
        params = model.base_params(mergeable_names(base))
    head = {"classifier.weight": torch.randn(2, model.module.config.hidden_size, generator=torch.Generator().manual_seed(0)),
            "classifier.bias": torch.zeros(2)}
    sorted_trimmed = task_scores(model, params, head, data, batch_size=3)
    whole = task_scores(model, params, head, data, batch_size=10)
    assert sorted_trimmed[0] == whole[0]
    assert abs(sorted_trimmed[1] - whole[1]) < 1e-5


def test_a_long_line_is_cut_before_it_is_tokenised_and_gives_the_same_tokens(tiny_base_dir):
    """An 11 MB line held over a GB while tokenised whole, for the 64 tokens kept; cut first, it
    tokenises to the very ids the whole text truncated gives."""
    import time

    from transformers import AutoTokenizer

    from supermerge.merge_core.data import cut_text, tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    words = [f"w{i % 59}" for i in range(400)]
    long_text = " ".join(words) + " " + "w7 " * 3_000_000  # ~9 MB
    cut = cut_text(long_text, tokenizer, 64)
    assert len(cut) < 64 * 16 and long_text.startswith(cut)
    started = time.perf_counter()
    data = tokenize([long_text, "w1 w2"], [0, 1], tokenizer, max_length=64)
    assert time.perf_counter() - started < 2
    whole = tokenizer(long_text[:100_000], truncation=True, max_length=64)["input_ids"]
    assert data.inputs["input_ids"][0].tolist() == whole
    short = "w1 " * 10
    assert cut_text(short, tokenizer, 64) == short  # a short text is kept whole
    spaced = "w1" + " " * 5000 + "w2 w3"  # few tokens in many characters: grown until whole
    assert cut_text(spaced, tokenizer, 64) == spaced


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    return path


def _fine_tune_config(folder, id2label):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "id2label": id2label}))
    return folder


def test_label_names_read_as_the_fine_tunes_class_ids(tiny_base_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_base_dir)
    ft = _fine_tune_config(tmp_path / "ft", {"0": "negative", "1": "neutral", "2": "positive"})
    ids = label_ids(ft, "sentiment")
    assert ids == {"negative": 0, "neutral": 1, "positive": 2}
    texts = ["w5 w6", "w7", "w8 w9 w10"]
    by_id = load_task_data(_write_jsonl(tmp_path / "ids.jsonl", zip(texts, [2, 0, 1])), tokenizer)
    by_name = load_task_data(_write_jsonl(tmp_path / "names.jsonl", zip(texts, ["positive", "negative", 1])),
                             tokenizer, label_ids=ids)
    assert by_name.labels.tolist() == [2, 0, 1]
    assert by_name.tensors().keys() == by_id.tensors().keys()
    assert all(torch.equal(by_name.tensors()[k], by_id.tensors()[k]) for k in by_id.tensors())


def test_an_unknown_label_name_names_the_known_ones(tiny_base_dir, tmp_path):
    data = _write_jsonl(tmp_path / "names.jsonl", [("w5", "positive"), ("w6", "postive")])
    with pytest.raises(DataError, match=r"names.jsonl:2: label 'postive' is not a class of the task: its fine-tune's "
                                        r"id2label names 'negative' \(0\), 'positive' \(1\)"):
        load_task_data(data, load_tokenizer(tiny_base_dir), label_ids={"negative": 0, "positive": 1})


def test_label_names_without_the_fine_tunes_names_say_how_to_fix_it(tiny_base_dir, tmp_path):
    placeholders = _fine_tune_config(tmp_path / "ft", {"0": "LABEL_0", "1": "LABEL_1"})
    assert label_ids(placeholders, "t") is None and label_ids(tmp_path, "t") is None  # LABEL_i, no config.json
    data = _write_jsonl(tmp_path / "names.jsonl", [("w5", "positive")])
    with pytest.raises(DataError, match=r"names.jsonl:1: 'label' is the name 'positive', but the task's fine-tune "
                                        r"names no classes .* give class ids \(0, 1, ...\), or add the names to the "
                                        r"fine-tune's config.json"):
        load_task_data(data, load_tokenizer(tiny_base_dir), label_ids=label_ids(placeholders, "t"))

"""Batches cut their padding without changing what the model computes."""

from __future__ import annotations

import torch

from merge_core.checkpoint import open_checkpoint
from merge_core.data import TaskData
from merge_core.evaluate import task_scores
from merge_core.model import FunctionalModel
from merge_core.task_vectors import mergeable_names
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

    from merge_core.data import cut_text, tokenize

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

"""SuperMerge / AdaMerging engine: the math of W, its gradient, and that training helps."""

from __future__ import annotations

import math

import pytest
import torch

from merge_core.checkpoint import open_checkpoint
from merge_core.methods.learned import (
    LearnedMergeConfig,
    combine,
    learned_loss,
    weight_groups,
)
from merge_core.errors import ConfigError
from merge_core.merge import merge
from merge_core.model import FunctionalModel
from merge_core.task_vectors import load_task_vector, mergeable_names, stack_deltas
from tests.tiny import make_task_data

TASKS = ("alpha", "beta")


@pytest.fixture(scope="module")
def setup(tiny_base_dir, tiny_finetuned):
    with open_checkpoint(tiny_base_dir) as base:
        vectors = [load_task_vector(base, tiny_finetuned[t], name=t) for t in TASKS]
        names = mergeable_names(base)
    val = {t: make_task_data(t, 32, seed=100 + i) for i, t in enumerate(TASKS)}
    return vectors, names, val


def test_weight_groups_by_tensor_model_and_block():
    names = ["encoder.layer.0.a", "encoder.layer.0.b", "encoder.layer.1.a", "pooler.w"]
    assert weight_groups(names, "tensor") == (names, {n: i for i, n in enumerate(names)})
    groups, of = weight_groups(names, "model")
    assert groups == ["model"] and set(of.values()) == {0}
    groups, of = weight_groups(names, r"encoder\.layer\.(\d+)\.")
    assert groups == ["0", "1", "pooler.w"]
    assert [of[n] for n in names] == [0, 0, 1, 2]


def test_combine_by_hand():
    base = {"w": torch.tensor([1.0, 2.0])}
    stacked = {"w": torch.tensor([[1.0, 0.0], [0.0, 10.0]])}
    out = combine(base, stacked, torch.tensor([[0.5], [0.1]]), {"w": 0})
    assert torch.allclose(out["w"], torch.tensor([1.5, 3.0]))


def test_supermerge_at_atanh_c_equals_task_arithmetic(tiny_base_dir, setup):
    vectors, _, val = setup
    c = 0.4
    sm = merge(tiny_base_dir, vectors, "supermerge", params={"steps": 0, "init": c}, val=val)
    ta = merge(tiny_base_dir, vectors, "task_arithmetic", params={"lam": c})
    for n, t in ta.tensors.items():
        assert torch.allclose(sm.tensors[n], t, atol=1e-6), n
    assert torch.allclose(sm.learned.weights, torch.full_like(sm.learned.weights, math.atanh(c)))


def _loss_inputs(tiny_base_dir, setup, transform):
    vectors, names, val = setup
    model = FunctionalModel(tiny_base_dir)
    model.module.double()
    base = {n: p for n, p in model.base_params(names).items()}
    stacked = {n: stack_deltas(base[n], vectors, n).double() for n in names}
    heads = {t: {k: x.double() for k, x in v.heads[t].items()} for v in vectors for t in v.tasks}
    batches = {t: d.take(torch.arange(8)) for t, d in val.items()}
    config = LearnedMergeConfig(transform=transform)
    _, group_of = weight_groups(names, "tensor")
    return model, base, stacked, group_of, heads, batches, config, len(names)


@pytest.mark.parametrize("transform", ["tanh", "identity"])
def test_gradient_matches_finite_differences(tiny_base_dir, setup, transform):
    model, base, stacked, group_of, heads, batches, config, g = _loss_inputs(tiny_base_dir, setup, transform)
    gen = torch.Generator().manual_seed(3)
    w = (0.3 + 0.2 * torch.randn(2, g, generator=gen, dtype=torch.float64)).requires_grad_(True)
    loss = learned_loss(w, model, base, stacked, group_of, heads, batches, config)
    (grad,) = torch.autograd.grad(loss, w)
    eps = 1e-6
    for i, j in [(0, 0), (1, 3), (0, g - 1), (1, g // 2)]:
        plus, minus = w.detach().clone(), w.detach().clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        fd = (
            learned_loss(plus, model, base, stacked, group_of, heads, batches, config)
            - learned_loss(minus, model, base, stacked, group_of, heads, batches, config)
        ) / (2 * eps)
        assert float(grad[i, j]) == pytest.approx(float(fd), rel=1e-4, abs=1e-8)
    assert grad.abs().sum() > 0


def test_only_w_gets_gradients(tiny_base_dir, setup):
    model, base, stacked, group_of, heads, batches, config, g = _loss_inputs(tiny_base_dir, setup, "tanh")
    w = torch.zeros(2, g, dtype=torch.float64, requires_grad=True)
    learned_loss(w, model, base, stacked, group_of, heads, batches, config).backward()
    assert w.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.module.parameters())
    assert all(not d.requires_grad for d in stacked.values())


def test_tanh_off_changes_the_result(tiny_base_dir, setup):
    vectors, _, val = setup
    params = {"steps": 15, "lr": 0.05}
    on = merge(tiny_base_dir, vectors, "supermerge", params=params, val=val)
    off = merge(tiny_base_dir, vectors, "supermerge_no_tanh", params=params, val=val)
    assert on.learned.coefficients.abs().max() < 1
    diff = max(float((on.tensors[n] - off.tensors[n]).abs().max()) for n in on.tensors
               if on.tensors[n].is_floating_point())
    assert diff > 1e-4


def test_supermerge_loss_falls_and_beats_task_arithmetic(tiny_base_dir, tiny_finetuned):
    tasks = ("alpha", "beta", "gamma")
    with open_checkpoint(tiny_base_dir) as base:
        vectors = [load_task_vector(base, tiny_finetuned[t], name=t) for t in tasks]
    val = {t: make_task_data(t, 32, seed=200 + i) for i, t in enumerate(tasks)}
    test = {t: make_task_data(t, 400, seed=300 + i) for i, t in enumerate(tasks)}
    sm = merge(tiny_base_dir, vectors, "supermerge", params={"steps": 60, "lr": 0.05}, val=val)
    ta = merge(tiny_base_dir, vectors, "task_arithmetic", val=val)
    losses = sm.learned.losses
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    from merge_core.evaluate import evaluate

    model = FunctionalModel(tiny_base_dir)
    names = [n for n in sm.tensors if sm.tensors[n].is_floating_point()]
    acc_sm = evaluate(model, {n: sm.tensors[n] for n in names}, sm.heads, test)
    acc_ta = evaluate(model, {n: ta.tensors[n] for n in names}, ta.heads, test)
    mean = lambda a: sum(a.values()) / len(a)  # noqa: E731
    assert mean(acc_sm) > mean(acc_ta), (acc_sm, acc_ta)


def test_adamerging_weights_stay_in_unit_interval(tiny_base_dir, setup):
    vectors, _, val = setup
    unlabelled_ok = merge(tiny_base_dir, vectors, "adamerging", params={"steps": 10, "lr": 0.2}, val=val)
    c = unlabelled_ok.learned.coefficients
    assert float(c.min()) >= 0.0 and float(c.max()) <= 1.0
    assert not torch.allclose(c, torch.full_like(c, 0.3))


def test_bad_learned_config_is_one_clear_error():
    with pytest.raises(ConfigError, match="transform"):
        LearnedMergeConfig(transform="sigmoid")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="regex"):
        LearnedMergeConfig(granularity="(")

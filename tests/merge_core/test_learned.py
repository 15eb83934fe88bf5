"""SuperMerge / AdaMerging engine: the math of W, its gradient, and that training helps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.deltas import LowRankDelta
from supermerge.merge_core.methods.learned import (
    FactoredStack,
    LearnedMergeConfig,
    combine,
    learned_loss,
    stack_task_vectors,
    weight_groups,
)
from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.merge import merge
from supermerge.merge_core.model import FunctionalModel
from supermerge.merge_core.task_vectors import TaskVector, load_task_vector, mergeable_names, stack_deltas
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


@pytest.mark.parametrize("transform", ["tanh", "identity"])
def test_per_task_backward_gives_the_joint_loss_and_gradient(tiny_base_dir, setup, transform):
    """One task's activations at a time (the default) is the same step as all tasks at once."""
    import dataclasses

    from supermerge.merge_core.methods.learned import backward_step

    model, base, stacked, group_of, heads, batches, config, g = _loss_inputs(tiny_base_dir, setup, transform)
    assert len(batches) > 1 and config.backward == "per_task"
    w0 = 0.3 + 0.2 * torch.randn(2, g, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads, losses = [], []
    for mode in ("per_task", "joint"):
        w = w0.clone().requires_grad_(True)
        losses.append(backward_step(w, model, base, stacked, group_of, heads, batches,
                                    dataclasses.replace(config, backward=mode)))
        grads.append(w.grad)
    reference = learned_loss(w0.clone().requires_grad_(True), model, base, stacked, group_of, heads, batches, config)
    assert losses[0] == pytest.approx(losses[1], rel=1e-12) == pytest.approx(float(reference.detach()), rel=1e-12)
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-14) and grads[0].abs().sum() > 0


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
    from supermerge.merge_core.evaluate import evaluate

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


# --- how the task vectors are held: LoRA factored, bf16 storage ----------------------------------

LORA_TARGETS = ("encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.value.weight")


def _lora_vectors(base: dict[str, torch.Tensor], k: int, rank: int) -> list[TaskVector]:
    """k LoRA task vectors on LORA_TARGETS (model i leaves the second target alone when i is odd)."""
    g = torch.Generator().manual_seed(5)
    vectors = []
    for i in range(k):
        deltas = {}
        for j, n in enumerate(LORA_TARGETS):
            if j == 1 and i % 2:
                continue
            out, inner = base[n].shape
            deltas[n] = LowRankDelta(B=torch.randn(out, rank, generator=g), A=torch.randn(rank, inner, generator=g),
                                     scale=0.05 * (i + 1))
        vectors.append(TaskVector(name=f"m{i}", source=Path("."), deltas=deltas))
    return vectors


def _grad_of_sum_sq(base, stacked, coeffs, group_of):
    c = coeffs.clone().requires_grad_(True)
    merged = combine(base, stacked, c, group_of)
    loss = sum((t * t).sum() for t in merged.values())
    (grad,) = torch.autograd.grad(loss, c)
    return {n: t.detach() for n, t in merged.items()}, grad


def test_lora_task_vectors_stay_factored_and_equal_the_dense_merge(tiny_base_dir):
    model = FunctionalModel(tiny_base_dir)
    with open_checkpoint(tiny_base_dir) as ck:
        names = mergeable_names(ck)
    base = model.base_params(names)
    vectors = _lora_vectors(base, k=3, rank=2)
    factored = stack_task_vectors(base, vectors)
    dense = {n: stack_deltas(base[n], vectors, n) for n in names}
    for n in LORA_TARGETS:
        assert isinstance(factored[n], FactoredStack) and factored[n].B.shape[1] == (6 if n == LORA_TARGETS[0] else 4)
    assert isinstance(factored["encoder.layer.0.output.dense.weight"], FactoredStack)  # no model: rank 0
    assert isinstance(factored["embeddings.LayerNorm.weight"], torch.Tensor)  # 1-D: dense zeros
    _, group_of = weight_groups(names, "tensor")
    coeffs = torch.rand(3, len(names), generator=torch.Generator().manual_seed(0)) - 0.3
    got, got_grad = _grad_of_sum_sq(base, factored, coeffs, group_of)
    want, want_grad = _grad_of_sum_sq(base, dense, coeffs, group_of)
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-4)
    targeted = got_grad[:, [names.index(n) for n in LORA_TARGETS]]
    assert targeted[1, 1] == 0 and targeted.abs().sum() - targeted[1, 1].abs() > 0  # model 1 skips target 2
    assert (targeted.abs() > 0).sum() == 5


def test_lora_is_kept_dense_where_dense_is_cheaper():
    base = {"w": torch.zeros(4, 4)}
    def lora(rank: int) -> list[TaskVector]:
        delta = LowRankDelta(torch.ones(4, rank), torch.ones(rank, 4), 1.0)
        return [TaskVector(f"m{i}", Path("."), {"w": delta}) for i in range(2)]

    low, high = lora(1), lora(2)
    assert isinstance(stack_task_vectors(base, low)["w"], FactoredStack)  # 2 * 8 < 2 * 16
    dense = stack_task_vectors(base, high)["w"]  # 4 * 8 >= 2 * 16
    assert isinstance(dense, torch.Tensor) and torch.equal(dense, torch.full((2, 4, 4), 2.0))


def test_bf16_storage_accumulates_in_fp32_and_stays_close(setup):
    vectors, names, _ = setup
    g = torch.Generator().manual_seed(1)
    big = {"big": torch.randn(1 << 20 | 12345, generator=g)}  # more than one chunk
    base = {**{n: torch.zeros(vectors[0].deltas[n].shape) for n in names}, **big}
    big_vectors = [TaskVector(v.name, v.source, {**v.deltas, "big": torch.randn(big["big"].shape, generator=g)})
                   for v in vectors]
    fp32 = stack_task_vectors(base, big_vectors)
    bf16 = stack_task_vectors(base, big_vectors, "bfloat16")
    assert all(s.dtype == torch.bfloat16 for s in bf16.values())
    _, group_of = weight_groups(list(base), "tensor")
    coeffs = torch.rand(2, len(base), generator=g)
    got, got_grad = _grad_of_sum_sq(base, bf16, coeffs, group_of)
    want, want_grad = _grad_of_sum_sq(base, fp32, coeffs, group_of)
    exact, exact_grad = _grad_of_sum_sq(base, {n: s.float() for n, s in bf16.items()}, coeffs, group_of)
    for n in base:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n], exact[n], rtol=1e-5, atol=1e-6, msg=n)  # fp32 math on bf16 values
        scale = want[n].abs().max()
        assert (got[n] - want[n]).abs().max() <= 1e-2 * scale, n  # bf16 keeps ~3 significant digits
    torch.testing.assert_close(got_grad, exact_grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got_grad, want_grad, rtol=2e-2, atol=1e-3)


def test_supermerge_with_bf16_storage_is_close_to_fp32(tiny_base_dir, setup):
    vectors, _, val = setup
    params = {"steps": 5, "lr": 0.05}
    fp32 = merge(tiny_base_dir, vectors, "supermerge", params=params, val=val)
    bf16 = merge(tiny_base_dir, vectors, "supermerge", params={**params, "storage_dtype": "bfloat16"}, val=val)
    assert bf16.params["storage_dtype"] == "bfloat16"
    # a fifth of one Adam step (lr 0.05): the rounded deltas barely move W
    torch.testing.assert_close(bf16.learned.weights, fp32.learned.weights, rtol=0, atol=1e-2)
    for n, t in fp32.tensors.items():
        if t.is_floating_point():
            torch.testing.assert_close(bf16.tensors[n], t, rtol=0, atol=1e-3, msg=n)
    with pytest.raises(ConfigError, match="storage_dtype"):
        LearnedMergeConfig(storage_dtype="int8")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_sum_matches_tensordot_in_value_and_gradient(monkeypatch, dtype):
    """The path that reads a stack chunk by chunk (bf16 storage, or host memory on a GPU run) gives
    the dense contraction's value and gradient; small chunks so the loop runs many times."""
    from supermerge.merge_core.methods import learned

    monkeypatch.setattr(learned, "TRANSFER_CHUNK", 7)
    stack = torch.randn(3, 5, 6).to(dtype)
    coeffs = torch.tensor([0.3, -0.7, 1.1], requires_grad=True)
    out = learned._ChunkedSum.apply(coeffs, stack)
    grad_out = torch.randn(5, 6)
    (out * grad_out).sum().backward()
    ref_coeffs = coeffs.detach().clone().requires_grad_(True)
    ref = torch.tensordot(ref_coeffs, stack.to(torch.float32), dims=1)
    (ref * grad_out).sum().backward()
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(coeffs.grad, ref_coeffs.grad, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_task_vectors_offloaded_to_host_memory_train_the_same_weights(tiny_base_dir, setup):
    """On a GPU, stacks kept in pinned host memory (the planner's offload) train W as stacks on the GPU do."""
    vectors, _, val = setup
    params = {"steps": 5, "lr": 0.05}
    on_gpu = merge(tiny_base_dir, vectors, "supermerge", params=params, val=val, device="cuda")
    offloaded = merge(tiny_base_dir, vectors, "supermerge", params=params, val=val, device="cuda",
                      task_vector_device="cpu")
    assert torch.allclose(on_gpu.learned.weights, offloaded.learned.weights, atol=1e-5)


def test_a_merged_input_starts_at_its_tasks_times_init_capped():
    """A tree node's input that serves m tasks already carries its own weights: it starts at m * init
    (capped at 0.9) instead of shrinking its tasks by init once more; ``same`` keeps the paper's init."""
    from supermerge.merge_core.methods.learned import MERGED_INIT_CAP, initial_coefficients, initial_weights

    config = LearnedMergeConfig(init=0.3)
    assert initial_coefficients([1, 2, 3, 5], config) == pytest.approx([0.3, 0.6, MERGED_INIT_CAP, MERGED_INIT_CAP])
    same = LearnedMergeConfig(init=0.3, init_merged="same")
    assert initial_coefficients([1, 2, 3], same) == [0.3, 0.3, 0.3]
    w = initial_weights(2, 4, config, [1, 2])
    assert w.shape == (2, 4) and torch.allclose(torch.tanh(w[:, 0]), torch.tensor([0.3, 0.6]))
    with pytest.raises(ConfigError, match="init_merged"):
        LearnedMergeConfig(init_merged="half")  # type: ignore[arg-type]


def test_released_task_vectors_are_held_once_and_train_the_same_weights(tiny_base_dir, tiny_finetuned, setup):
    """With release_task_vectors (what the node runner asks for), each delta leaves its task vector as it
    enters its stack: same merge, and nothing of the inputs' deltas is held twice."""
    _, _, val = setup
    with open_checkpoint(tiny_base_dir) as base:
        fresh = [load_task_vector(base, tiny_finetuned[t], name=t) for t in TASKS]
        kept = [load_task_vector(base, tiny_finetuned[t], name=t) for t in TASKS]
    params = {"steps": 3, "lr": 0.05}
    released = merge(tiny_base_dir, fresh, "supermerge", params=params, val=val, release_task_vectors=True)
    reference = merge(tiny_base_dir, kept, "supermerge", params=params, val=val)
    assert all(not v.deltas for v in fresh) and all(v.deltas for v in kept)
    assert all(v.heads for v in fresh)  # heads are not task vectors: kept
    assert torch.equal(released.learned.weights, reference.learned.weights)

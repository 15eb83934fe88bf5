"""The learned merges' engine: train per-model, per-tensor merge weights W through the merged forward.

``theta_m(j) = theta_p(j) + sum_i f(W[i, g(j)]) * tau(i, j)`` where ``g`` maps tensor j to its weight
group (one per tensor by default) and ``f`` is tanh (SuperMerge), the identity (SuperMerge without
tanh), or the identity with W projected onto [0, 1] after each step (AdaMerging). The loss is each
task's own supervised loss (SuperMerge) or the entropy of its predictions (AdaMerging), averaged over
tasks; every step builds the merged tensors once and runs each task's batch through them.

The k task vectors of a tensor are held as one ``TaskVectorStack``: dense (k, *shape), fp32 or, with
``storage_dtype``, bf16/fp16 read back in fp32 chunk by chunk; or, for LoRA adapters, factored
(``FactoredStack``: the B_i and A_i side by side), which is cheaper wherever ``R * (out + in) <
k * out * in`` (R the summed ranks). Either way a step builds each merged tensor once, without a
k-fold (k, *shape) temporary, and autograd keeps only references to the stack for the backward pass.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from merge_core.data import TaskData, require_labelled
from merge_core.deltas import LowRankDelta
from merge_core.errors import ConfigError
from merge_core.model import FunctionalModel, prediction_entropy, task_loss
from merge_core.task_vectors import TaskVector, stack_deltas

log = logging.getLogger(__name__)

Transform = Literal["tanh", "identity", "clamp01"]
Objective = Literal["supervised", "entropy"]
StorageDtype = Literal["float32", "bfloat16", "float16"]

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


@dataclass(frozen=True)
class LearnedMergeConfig:
    """How W is trained. Field defaults are SuperMerge's; AdaMerging is another instance."""

    transform: Transform = "tanh"
    """tanh bounds each coefficient to (-1, 1) (the paper loses ~5 points without it)."""
    objective: Objective = "supervised"
    """supervised: each task's own loss on labelled validation data; entropy: AdaMerging's."""
    init: float = 0.3
    """Initial coefficient f(W) for every model and tensor (W itself is atanh(init) under tanh)."""
    lr: float = 1e-2
    steps: int = 100
    batch_size: int = 16
    """Examples per task per step."""
    weight_decay: float = 0.0
    granularity: str = "tensor"
    """'tensor' (one weight per tensor), 'model' (one per model), or a regex whose first group (or
    whole match) names a block, e.g. r'encoder\\.layer\\.(\\d+)\\.'; unmatched tensors keep their own."""
    seed: int = 0
    storage_dtype: StorageDtype = "float32"
    """How the stacked task vectors are held: bfloat16/float16 halve their memory (the largest term,
    k times the model) at the cost of rounding each delta; the merge is still accumulated in fp32."""

    def __post_init__(self) -> None:
        problems = []
        if self.transform not in ("tanh", "identity", "clamp01"):
            problems.append(f"transform must be tanh, identity or clamp01, not {self.transform!r}")
        if self.objective not in ("supervised", "entropy"):
            problems.append(f"objective must be supervised or entropy, not {self.objective!r}")
        if self.transform == "tanh" and not -1 < self.init < 1:
            problems.append(f"init {self.init} must lie in (-1, 1) under tanh")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            problems.append("steps >= 0, batch_size >= 1 and lr > 0 are required")
        if self.storage_dtype not in STORAGE_DTYPES:
            problems.append(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, not {self.storage_dtype!r}")
        if self.granularity not in ("tensor", "model"):
            try:
                re.compile(self.granularity)
            except re.error as e:
                problems.append(f"granularity {self.granularity!r} is not a valid regex: {e}")
        if problems:
            raise ConfigError("learned merge config: " + "; ".join(problems))


@dataclass
class LearnedMerge:
    """The trained merge weights. ``weights`` is raw W (k, G); ``coefficients`` is f(W)."""

    weights: Tensor
    coefficients: Tensor
    groups: list[str]
    group_of: dict[str, int]
    losses: list[float] = field(default_factory=list)


def weight_groups(names: Sequence[str], granularity: str) -> tuple[list[str], dict[str, int]]:
    """Group names in first-seen order and each tensor's group index."""
    if granularity == "tensor":
        keys = list(names)
    elif granularity == "model":
        keys = ["model"] * len(names)
    else:
        pattern = re.compile(granularity)
        keys = []
        for n in names:
            m = pattern.search(n)
            keys.append(n if m is None else (m.group(1) if m.groups() else m.group(0)))
    groups = list(dict.fromkeys(keys))
    index = {g: i for i, g in enumerate(groups)}
    return groups, {n: index[k] for n, k in zip(names, keys, strict=True)}


def coefficients(weights: Tensor, transform: Transform) -> Tensor:
    return torch.tanh(weights) if transform == "tanh" else weights


def initial_weights(k: int, n_groups: int, config: LearnedMergeConfig) -> Tensor:
    value = math.atanh(config.init) if config.transform == "tanh" else config.init
    return torch.full((k, n_groups), value, dtype=torch.float32)


@dataclass(frozen=True)
class FactoredStack:
    """The k task vectors of one (out, in) weight as LoRA factors: ``tau_i = scale_i * B_i @ A_i``.

    ``B`` (out, R) and ``A`` (R, in) hold every model's factors side by side (R = sum of the ranks),
    ``owner`` (R,) says which model each rank belongs to and ``scale`` (R,) its scale. A model
    without a delta for the tensor owns no rank.
    """

    B: Tensor
    A: Tensor
    owner: Tensor
    scale: Tensor
    k: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.k, self.B.shape[0], self.A.shape[1])

    def to(self, device: torch.device | str) -> FactoredStack:
        return FactoredStack(self.B.to(device), self.A.to(device), self.owner.to(device),
                             self.scale.to(device), self.k)

    def weighted_sum(self, coeffs: Tensor) -> Tensor:
        """``sum_i coeffs[i] * tau_i`` (out, in) in fp32, as one (out, R) @ (R, in) product."""
        row = coeffs.to(torch.float32)[self.owner] * self.scale
        return (self.B.to(torch.float32) * row) @ self.A.to(torch.float32)


TaskVectorStack = Tensor | FactoredStack
"""One tensor's k task vectors: dense (k, *shape), or factored for LoRA adapters."""

_CHUNK = 1 << 20
"""Values per chunk when a low-precision stack is read back in fp32 (4 MiB per model)."""


class _LowPrecisionSum(torch.autograd.Function):
    """``sum_i c_i * d_i`` over a bf16/fp16 stack, accumulated in fp32 one chunk at a time, so no
    fp32 copy of the stack exists; the backward pass (``dL/dc_i = <g, d_i>``) reads it the same way."""

    @staticmethod
    def forward(ctx, coeffs: Tensor, stack: Tensor) -> Tensor:  # type: ignore[override]
        flat = stack.reshape(stack.shape[0], -1)
        out = torch.empty(flat.shape[1], dtype=torch.float32, device=stack.device)
        for start in range(0, flat.shape[1], _CHUNK):
            out[start:start + _CHUNK] = coeffs @ flat[:, start:start + _CHUNK].to(torch.float32)
        ctx.save_for_backward(stack)
        return out.reshape(stack.shape[1:])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (stack,) = ctx.saved_tensors
        flat = stack.reshape(stack.shape[0], -1)
        g = grad.reshape(-1).to(torch.float32)
        total = torch.zeros(flat.shape[0], dtype=torch.float32, device=stack.device)
        for start in range(0, flat.shape[1], _CHUNK):
            total += flat[:, start:start + _CHUNK].to(torch.float32) @ g[start:start + _CHUNK]
        return total, None


def weighted_sum(stack: TaskVectorStack, coeffs: Tensor) -> Tensor:
    """``sum_i coeffs[i] * tau_i`` for one tensor; ``coeffs`` (k,). Dense stacks of fp32 or wider are
    contracted in their own dtype (one tensordot), narrower ones in fp32."""
    if isinstance(stack, FactoredStack):
        return stack.weighted_sum(coeffs)
    if stack.dtype in (torch.bfloat16, torch.float16):
        return _LowPrecisionSum.apply(coeffs.to(torch.float32), stack)
    return torch.tensordot(coeffs.to(stack.dtype), stack, dims=1)


def combine(
    base: Mapping[str, Tensor],
    stacked: Mapping[str, TaskVectorStack],
    coeffs: Tensor,
    group_of: Mapping[str, int],
) -> dict[str, Tensor]:
    """``base + sum_i coeffs[i, g(j)] * tau(i, j)`` for every tensor j in ``stacked`` ((k, *shape))."""
    return {n: base[n] + weighted_sum(d, coeffs[:, group_of[n]]) for n, d in stacked.items()}


def _factored(name: str, vectors: Sequence[TaskVector], shape: tuple[int, ...],
              dtype: torch.dtype) -> FactoredStack | None:
    """The LoRA factors of ``name`` side by side, when every model that changes it is LoRA and
    that is smaller than the dense stack; else None."""
    found = [(i, v.deltas[name]) for i, v in enumerate(vectors) if name in v.deltas]
    lora = [(i, d) for i, d in found if isinstance(d, LowRankDelta)]
    if len(shape) != 2 or len(lora) != len(found):
        return None
    out, inner = shape
    ranks = [d.A.shape[0] for _, d in lora]
    if sum(ranks) * (out + inner) >= len(vectors) * out * inner:
        return None
    B = torch.cat([torch.zeros(out, 0)] + [d.B.to(torch.float32) for _, d in lora], dim=1)
    A = torch.cat([torch.zeros(0, inner)] + [d.A.to(torch.float32) for _, d in lora], dim=0)
    owner = torch.tensor([i for (i, _), r in zip(lora, ranks) for _ in range(r)], dtype=torch.long)
    scale = torch.tensor([d.scale for (_, d), r in zip(lora, ranks) for _ in range(r)], dtype=torch.float32)
    return FactoredStack(B.to(dtype), A.to(dtype), owner, scale, len(vectors))


def stack_task_vectors(
    base: Mapping[str, Tensor],
    vectors: Sequence[TaskVector],
    storage_dtype: StorageDtype = "float32",
    device: torch.device | str = "cpu",
) -> dict[str, TaskVectorStack]:
    """Every tensor's k task vectors as the learned merge holds them: LoRA factors side by side where
    that is smaller (``FactoredStack``), else the dense (k, *shape) stack, in ``storage_dtype``."""
    dtype = STORAGE_DTYPES[storage_dtype]
    out: dict[str, TaskVectorStack] = {}
    for n, b in base.items():
        factored = _factored(n, vectors, tuple(b.shape), dtype)
        if factored is not None:
            out[n] = factored.to(device)
        else:
            out[n] = stack_deltas(b, vectors, n).to(dtype).to(device)
    return out


def _objective_loss(
    model: FunctionalModel,
    params: Mapping[str, Tensor],
    heads: Mapping[str, Mapping[str, Tensor]],
    batches: Mapping[str, TaskData],
    objective: Objective,
) -> Tensor:
    losses = []
    for task, batch in batches.items():
        logits = model.logits(params, heads[task], batch.inputs)
        if objective == "supervised":
            losses.append(task_loss(model.kind, logits, batch.labels))
        else:
            losses.append(prediction_entropy(model.kind, logits, batch.inputs))
    return torch.stack(losses).mean()


def learned_loss(
    weights: Tensor,
    model: FunctionalModel,
    base: Mapping[str, Tensor],
    stacked: Mapping[str, TaskVectorStack],
    group_of: Mapping[str, int],
    heads: Mapping[str, Mapping[str, Tensor]],
    batches: Mapping[str, TaskData],
    config: LearnedMergeConfig,
) -> Tensor:
    """The scalar loss as a function of raw W (exposed for gradient checks)."""
    params = combine(base, stacked, coefficients(weights, config.transform), group_of)
    return _objective_loss(model, params, heads, batches, config.objective)


def train_merge_weights(
    model: FunctionalModel,
    base: Mapping[str, Tensor],
    stacked: Mapping[str, TaskVectorStack],
    heads: Mapping[str, Mapping[str, Tensor]],
    data: Mapping[str, TaskData],
    config: LearnedMergeConfig,
    *,
    progress: bool = False,
) -> LearnedMerge:
    """Train W with AdamW; base and task vectors stay frozen (only W requires grad).

    ``stacked``: base name -> its k task vectors on the model's device (``stack_task_vectors``). ``heads``/``data``: per
    task. Each step draws ``batch_size`` examples per task with a generator seeded by ``config.seed``.
    """
    if config.objective == "supervised":
        for task in data:
            require_labelled(task, data[task])
    missing = sorted(set(data) - set(heads))
    if missing:
        raise ConfigError(f"no head for task(s) {missing}: each task needs its fine-tuned head")
    k = next(iter(stacked.values())).shape[0]
    groups, group_of = weight_groups(list(stacked), config.granularity)
    device = model.device
    weights = initial_weights(k, len(groups), config).to(device).requires_grad_(True)
    optimizer = torch.optim.AdamW([weights], lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    data = {t: d.to(device) for t, d in data.items()}
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="training merge weights", disable=not progress, leave=False)
    for _ in bar:
        batches = {t: d.sample(config.batch_size, generator) for t, d in data.items()}
        loss = learned_loss(weights, model, base, stacked, group_of, heads, batches, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if config.transform == "clamp01":
            with torch.no_grad():
                weights.clamp_(0.0, 1.0)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    log.info("merge weights trained: %d steps, loss %.4f -> %.4f", config.steps,
             losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    final = weights.detach()
    return LearnedMerge(
        weights=final.cpu(),
        coefficients=coefficients(final, config.transform).cpu(),
        groups=groups,
        group_of=group_of,
        losses=losses,
    )

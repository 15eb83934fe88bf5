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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from supermerge.merge_core.data import TaskData, require_labelled
from supermerge.merge_core.deltas import LowRankDelta, dense_delta
from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.model import FunctionalModel, prediction_entropy, task_loss
from supermerge.merge_core.task_vectors import TaskVector, stack_deltas

log = logging.getLogger(__name__)

Transform = Literal["tanh", "identity", "clamp01"]
Objective = Literal["supervised", "entropy"]
Backward = Literal["per_task", "joint"]
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
    init_merged: Literal["by_tasks", "same"] = "by_tasks"
    """How an input that is itself a merge of m tasks (a node of a merge tree) starts. by_tasks:
    at min(m * init, MERGED_INIT_CAP), since its task vector already carries its own merge weights and
    starting it at init would shrink each of its tasks by init once more at every level of the tree.
    same: at init, like a fine-tuned model."""
    lr: float = 5e-2
    """AdamW's learning rate. Adam moves each weight by about ``lr`` a step, and W must travel from
    atanh(0.3) = 0.31 to about atanh(0.95) = 1.8 (or below 0) to use tanh's range: 5e-2 lets it within
    the 40-100 steps a merge takes. At 1e-2 and 40 steps the coefficients could not pass 0.6 and the
    validation loss stalled (4 MiniLM tasks: 1.11 -> 0.99 at 1e-2, 1.05 -> 0.87 at 5e-2)."""
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
    backward: Backward = "per_task"
    """per_task: each task's batch runs forward and backward on its own, its gradient w.r.t. the merged
    tensors accumulated, then one backward through the merge to W: autograd holds one task's
    activations at a time (plus one model-sized gradient), so a node's memory follows its fan-in, not
    the number of tasks beneath it. joint: every task forward, one backward (holds all tasks'
    activations at once; cheaper only when they are smaller than one model). Same loss, same gradient."""
    holdout: int = 0
    """Early stopping: examples per task held out of the validation data (seeded) to pick the step;
    W trains on the rest for at most ``steps``, its held-out loss (each task's own supervised loss,
    whatever the objective, so every learned method is stopped by the same rule) is measured every
    ``eval_every`` steps, training stops after ``patience`` checks without a new best and the W of the
    best check is returned. 0: train all ``steps`` on all the data."""
    eval_every: int = 10
    patience: int = 3

    basis: Literal["task_vectors", "tsv", "iso_cts", "compressed"] = "task_vectors"
    """What W weights: the raw task vectors, (tsv) each matrix's TSV-M decorrelated per-task pieces
    (supermerge.merge_core.methods.basis; all coefficients alpha = TSV-M at alpha), (iso_cts) its
    Iso-CTS pieces (each task's own directions + 1/k of the common subspace, isotropic spectrum; all
    coefficients alpha = Iso-CTS at alpha), or (compressed) each task
    vector with its matrices cut to their top ``rank`` singular components (supermerge.merge_core.compress):
    k tasks then hold about one to two dense task vectors' memory, not k."""
    rank: int | None = None
    """basis compressed: singular components kept per task and matrix; None: TSV-M's
    floor(min(out, in) / k)."""
    init_from: Literal["constant", "training_free"] = "constant"
    """constant: every coefficient starts at ``init``. training_free: the basis' training-free scale
    (TA's lam, TSV-M's alpha) is first chosen on the validation data and W starts at that merge."""

    def __post_init__(self) -> None:
        problems = []
        if self.basis not in ("task_vectors", "tsv", "iso_cts", "compressed"):
            problems.append(f"basis must be task_vectors, tsv, iso_cts or compressed, not {self.basis!r}")
        if self.rank is not None and (self.basis != "compressed" or isinstance(self.rank, bool)
                                      or not isinstance(self.rank, int) or self.rank < 1):
            problems.append(f"rank {self.rank!r} applies only to basis: compressed and must be an integer >= 1 "
                            "(singular components kept per task and matrix)")
        if self.init_from not in ("constant", "training_free"):
            problems.append(f"init_from must be constant or training_free, not {self.init_from!r}")
        if self.init_from == "training_free" and self.init == 0:
            problems.append("init_from: training_free scales the basis by scale / init, so init must not be 0")
        if self.transform not in ("tanh", "identity", "clamp01"):
            problems.append(f"transform must be tanh, identity or clamp01, not {self.transform!r}")
        if self.objective not in ("supervised", "entropy"):
            problems.append(f"objective must be supervised or entropy, not {self.objective!r}")
        if self.transform == "tanh" and not -1 < self.init < 1:
            problems.append(f"init {self.init} must lie in (-1, 1) under tanh")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            problems.append("steps >= 0, batch_size >= 1 and lr > 0 are required")
        if self.holdout < 0 or self.eval_every < 1 or self.patience < 1:
            problems.append("holdout >= 0, eval_every >= 1 and patience >= 1 are required")
        if self.init_merged not in ("by_tasks", "same"):
            problems.append(f"init_merged must be by_tasks or same, not {self.init_merged!r}")
        if self.backward not in ("per_task", "joint"):
            problems.append(f"backward must be per_task or joint, not {self.backward!r}")
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
    steps_used: int | None = None
    """The step whose W this is, when early stopping chose it (``LearnedMergeConfig.holdout``)."""
    holdout_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, held-out loss) at each early-stopping check."""
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of each training step (sampling, forward and backward over every task, AdamW)."""


def split_holdout(data: TaskData, holdout: int, generator: torch.Generator) -> tuple[TaskData, TaskData]:
    """(train, held out) rows of one task's validation data, ``holdout`` of them held out at random."""
    if not 0 < holdout < len(data):
        raise ConfigError(f"holdout {holdout} must be between 1 and the {len(data)} validation examples - 1")
    order = torch.randperm(len(data), generator=generator)
    return data.take(order[holdout:]), data.take(order[:holdout])


@torch.no_grad()
def holdout_loss(
    weights: Tensor, model: FunctionalModel, base: Mapping[str, Tensor], stacked: Mapping[str, TaskVectorStack],
    group_of: Mapping[str, int], heads: Mapping[str, Mapping[str, Tensor]], held: Mapping[str, TaskData],
    config: LearnedMergeConfig,
) -> float:
    """Mean over tasks of each task's supervised loss on its held-out rows: the early-stopping score."""
    params = combine(base, stacked, coefficients(weights, config.transform), group_of)
    return _objective_loss(model, params, heads, held, "supervised").item()


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


MERGED_INIT_CAP = 0.9
"""The largest starting coefficient of a merged input (``init_merged: by_tasks``): inside tanh's range,
where its gradient is still a fifth of its slope at 0."""


def initial_coefficients(tasks_per_input: Sequence[int], config: LearnedMergeConfig) -> list[float]:
    """f(W) at the start, per input: ``init``, or for an input serving m > 1 tasks ``min(m * init,
    MERGED_INIT_CAP)`` under ``init_merged: by_tasks`` (never below ``init``)."""
    if config.init_merged == "same":
        return [config.init] * len(tasks_per_input)
    return [config.init if m <= 1 else max(config.init, min(m * config.init, MERGED_INIT_CAP))
            for m in tasks_per_input]


def initial_weights(
    k: int, n_groups: int, config: LearnedMergeConfig, tasks_per_input: Sequence[int] | None = None
) -> Tensor:
    """Raw W (k, G) whose f(W) is ``initial_coefficients`` (every input a fine-tuned model by default)."""
    starts = initial_coefficients(tasks_per_input or [1] * k, config)
    values = [math.atanh(c) if config.transform == "tanh" else c for c in starts]
    return torch.tensor(values, dtype=torch.float32)[:, None].expand(k, n_groups).contiguous()


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

TRANSFER_CHUNK = 1 << 20
"""Values per chunk when a stack is read back in fp32 or onto the device (4 MiB per model)."""


class _ChunkedSum(torch.autograd.Function):
    """``sum_i c_i * d_i`` over a stack held in another dtype (bf16/fp16) or on another device (host
    memory, for a GPU merge whose task vectors do not fit the GPU) than ``coeffs``: the stack is read
    one chunk at a time, converted to fp32 on ``coeffs``' device and accumulated there, so neither an
    fp32 nor a device copy of the whole stack ever exists. The backward pass (``dL/dc_i = <g, d_i>``)
    reads it the same way; the stack itself gets no gradient (task vectors are frozen)."""

    @staticmethod
    def forward(ctx, coeffs: Tensor, stack: Tensor) -> Tensor:  # type: ignore[override]
        flat = stack.reshape(stack.shape[0], -1)
        out = torch.empty(flat.shape[1], dtype=torch.float32, device=coeffs.device)
        for start in range(0, flat.shape[1], TRANSFER_CHUNK):
            chunk = flat[:, start:start + TRANSFER_CHUNK].to(coeffs.device, torch.float32, non_blocking=True)
            out[start:start + TRANSFER_CHUNK] = coeffs @ chunk
        ctx.save_for_backward(stack)
        return out.reshape(stack.shape[1:])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (stack,) = ctx.saved_tensors
        flat = stack.reshape(stack.shape[0], -1)
        g = grad.reshape(-1).to(torch.float32)
        total = torch.zeros(flat.shape[0], dtype=torch.float32, device=grad.device)
        for start in range(0, flat.shape[1], TRANSFER_CHUNK):
            chunk = flat[:, start:start + TRANSFER_CHUNK].to(grad.device, torch.float32, non_blocking=True)
            total += chunk @ g[start:start + TRANSFER_CHUNK]
        return total, None


def weighted_sum(stack: TaskVectorStack, coeffs: Tensor) -> Tensor:
    """``sum_i coeffs[i] * tau_i`` for one tensor on ``coeffs``' device; ``coeffs`` (k,). Dense fp32
    stacks on that device are contracted in one tensordot; narrower or offloaded ones chunk by chunk."""
    if isinstance(stack, FactoredStack):
        return stack.weighted_sum(coeffs)
    if stack.dtype in (torch.bfloat16, torch.float16) or stack.device != coeffs.device:
        return _ChunkedSum.apply(coeffs.to(torch.float32), stack)
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
    dense_device: torch.device | str | None = None,
    *,
    release: bool = False,
) -> dict[str, TaskVectorStack]:
    """Every tensor's k task vectors as the learned merge holds them: LoRA factors side by side where
    that is smaller (``FactoredStack``), else the dense (k, *shape) stack, in ``storage_dtype``.

    Factored stacks go to ``device`` (the model's); dense ones to ``dense_device`` (default the same).
    The memory planner offloads them to the host (``dense_device='cpu'``) when a GPU holds the model but
    not k copies of it: they are then kept in pinned memory, from which each step copies them to the
    GPU chunk by chunk (``weighted_sum``) at full PCIe speed.

    ``release``: drop each tensor's deltas from ``vectors`` once they are in its stack (the caller's
    task vectors are emptied), so the task vectors are held once, as stacks, not twice: for k full
    fine-tunes that is k model-sized fp32 copies less at the peak."""
    dtype = STORAGE_DTYPES[storage_dtype]
    target = torch.device(device)
    dense_target = target if dense_device is None else torch.device(dense_device)
    pin = dense_target.type == "cpu" and target.type == "cuda"
    out: dict[str, TaskVectorStack] = {}
    for n, b in base.items():
        factored = _factored(n, vectors, tuple(b.shape), dtype)
        if factored is not None:
            out[n] = factored.to(target)
        elif release:
            # row by row, each delta dropped once copied: one tensor in flight, not k
            stack = torch.empty((len(vectors), *b.shape), dtype=dtype, device=dense_target, pin_memory=pin)
            host_base = b.cpu()
            for row, v in zip(stack, vectors, strict=True):
                delta = v.deltas.pop(n, None)
                if delta is None:
                    row.zero_()
                else:
                    row.copy_(dense_delta(delta, host_base))
                del delta
            out[n] = stack
        else:
            stack = stack_deltas(b.cpu(), vectors, n).to(dtype)
            out[n] = stack.pin_memory() if pin else stack.to(dense_target)
        if release:
            for v in vectors:
                v.deltas.pop(n, None)
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


def backward_step(
    weights: Tensor,
    model: FunctionalModel,
    base: Mapping[str, Tensor],
    stacked: Mapping[str, TaskVectorStack],
    group_of: Mapping[str, int],
    heads: Mapping[str, Mapping[str, Tensor]],
    batches: Mapping[str, TaskData],
    config: LearnedMergeConfig,
) -> float:
    """One step's loss (the mean over tasks, as ``learned_loss``); leaves its gradient in
    ``weights.grad``, with the tasks' activations held jointly or one task at a time (``config.backward``)."""
    if config.backward == "joint":
        loss = learned_loss(weights, model, base, stacked, group_of, heads, batches, config)
        loss.backward()
        return loss.item()
    params = combine(base, stacked, coefficients(weights, config.transform), group_of)
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    total = 0.0
    for task, batch in batches.items():
        loss = _objective_loss(model, leaves, {task: heads[task]}, {task: batch}, config.objective) / len(batches)
        loss.backward()
        total += loss.item()
    reached = [n for n, leaf in leaves.items() if leaf.grad is not None]
    torch.autograd.backward([params[n] for n in reached], [leaves[n].grad for n in reached])
    return total


def train_merge_weights(
    model: FunctionalModel,
    base: Mapping[str, Tensor],
    stacked: Mapping[str, TaskVectorStack],
    heads: Mapping[str, Mapping[str, Tensor]],
    data: Mapping[str, TaskData],
    config: LearnedMergeConfig,
    *,
    progress: bool = False,
    tasks_per_input: Sequence[int] | None = None,
) -> LearnedMerge:
    """Train W with AdamW; base and task vectors stay frozen (only W requires grad).

    ``tasks_per_input``: how many tasks each of the k inputs serves (> 1 for a merged model of a tree;
    see ``LearnedMergeConfig.init_merged``); default one each.

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
    weights = initial_weights(k, len(groups), config, tasks_per_input).to(device).requires_grad_(True)
    optimizer = torch.optim.AdamW([weights], lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    data = {t: d.to(device) for t, d in data.items()}
    held: dict[str, TaskData] = {}
    if config.holdout:
        parts = {t: split_holdout(d, config.holdout, generator) for t, d in data.items()}
        data, held = {t: a for t, (a, _) in parts.items()}, {t: b for t, (_, b) in parts.items()}
    checks: list[tuple[int, float]] = []
    best = (0, math.inf, weights.detach().clone())
    losses: list[float] = []
    step_seconds: list[float] = []
    bar = tqdm(range(config.steps), desc="training merge weights", disable=not progress, leave=False)
    for step in bar:
        if held and step % config.eval_every == 0:
            checks.append((step, holdout_loss(weights, model, base, stacked, group_of, heads, held, config)))
            if checks[-1][1] < best[1]:
                best = (step, checks[-1][1], weights.detach().clone())
            elif (step - best[0]) // config.eval_every >= config.patience:
                break
        step_started = time.perf_counter()
        batches = {t: d.sample(config.batch_size, generator) for t, d in data.items()}
        optimizer.zero_grad(set_to_none=True)
        loss = backward_step(weights, model, base, stacked, group_of, heads, batches, config)
        optimizer.step()
        if config.transform == "clamp01":
            with torch.no_grad():
                weights.clamp_(0.0, 1.0)
        losses.append(loss)
        step_seconds.append(time.perf_counter() - step_started)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    else:
        if held:
            checks.append((config.steps, holdout_loss(weights, model, base, stacked, group_of, heads, held, config)))
            if checks[-1][1] < best[1]:
                best = (config.steps, checks[-1][1], weights.detach().clone())
    if held:
        weights = best[2]
        log.info("early stopping: step %d of %d run (held-out loss %.4f)", best[0], len(losses), best[1])
    log.info("merge weights trained: %d steps, loss %.4f -> %.4f", len(losses),
             losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    final = weights.detach()
    return LearnedMerge(
        weights=final.cpu(),
        coefficients=coefficients(final, config.transform).cpu(),
        groups=groups,
        group_of=group_of,
        losses=losses,
        steps_used=best[0] if held else None,
        holdout_losses=checks,
        step_seconds=step_seconds,
    )

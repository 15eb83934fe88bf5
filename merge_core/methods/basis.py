"""What a learned merge weights, and where it starts (issue 14 part 2): SuperMerge's per-tensor tanh
weights over the TSV-decorrelated per-task pieces instead of the raw task vectors, and W started at
the merge a training-free method chose on the same validation data.

``basis: tsv`` replaces every matrix's k task vectors by their TSV-M pieces (supermerge.merge_core.methods.tsv):
task i's top ``min(out, in) // k`` singular triplets with the stacked U and V^T orthogonalised, held
factored (``FactoredStack``: ``r * (out + in)`` values instead of ``k * out * in``). Every other tensor
(and a matrix with fewer than k singular values) gets ``tau_i / k``. With every coefficient equal to
alpha the merge IS TSV-M at alpha (official treatment of non-matrices: alpha times the mean).

``basis: iso_cts`` does the same over Iso-CTS' components (supermerge.merge_core.methods.iso): task i's
piece of a matrix is its own orthogonalised directions plus 1/k of the common subspace, all at the
flattened singular value, held dense (the common part is shared, so factoring it per task would cost
k copies); with every coefficient alpha the merge IS Iso-CTS at alpha (fraction 0.8, the paper's).

``init_from: training_free`` first picks the basis' own training-free scale on the validation data
(Task Arithmetic's lam for task vectors, TSV-M's or Iso-CTS' alpha for their pieces, from their grids), then
scales the basis by ``scale / init`` so that W's starting coefficients ``init`` reproduce that merge
exactly; tanh then bounds each coefficient to +-(scale / init) times the basis.

``basis: compressed`` weights the task vectors with their matrices cut to their top singular
components (supermerge.merge_core.compress), held factored like LoRA deltas; ``init_from: training_free`` then
starts at Task Arithmetic over the compressed task vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from supermerge.merge_core.compress import compress_task_vector
from supermerge.merge_core.data import TaskData
from supermerge.merge_core.evaluate import task_scores
from supermerge.merge_core.methods import iso, task_arithmetic, tsv
from supermerge.merge_core.methods.learned import FactoredStack, LearnedMergeConfig, TaskVectorStack, combine
from supermerge.merge_core.model import FunctionalModel
from supermerge.merge_core.task_vectors import TaskVector

SCALE_GRIDS: dict[str, tuple[float, ...]] = {
    "task_vectors": task_arithmetic.PARAM_GRID["lam"],
    "compressed": task_arithmetic.PARAM_GRID["lam"],
    "tsv": tsv.PARAM_GRID["alpha"],
    "iso_cts": iso.ISO_CTS_GRID["alpha"],
}
"""The training-free scale searched per basis by ``init_from: training_free``."""


def dense_stack(stack: TaskVectorStack) -> Tensor:
    """The (k, *shape) fp32 task vectors of a stack, factored or not."""
    if not isinstance(stack, FactoredStack):
        return stack.to(torch.float32)
    out = torch.zeros(stack.shape, dtype=torch.float32, device=stack.B.device)
    for i in range(stack.k):
        mine = stack.owner == i
        out[i] = (stack.B[:, mine].float() * stack.scale[mine]) @ stack.A[mine].float()
    return out


def tsv_pieces(stack: TaskVectorStack) -> TaskVectorStack:
    """One tensor's TSV-M pieces in place of its task vectors (see the module docstring)."""
    deltas = dense_stack(stack)
    dtype = stack.B.dtype if isinstance(stack, FactoredStack) else stack.dtype
    k = deltas.shape[0]
    if deltas.dim() != 3 or min(deltas.shape[1:]) < k:
        return (deltas / k).to(dtype)
    u, s, vh = tsv.task_pieces(deltas)
    del deltas
    per_task = s.numel() // k
    owner = torch.arange(k, device=u.device).repeat_interleave(per_task)
    return FactoredStack((u * s).to(dtype), vh.to(dtype), owner, torch.ones_like(s), k)


ISO_CTS_FRACTION = iso.ISO_CTS_GRID["common_space_fraction"][0]


def iso_cts_pieces(stack: TaskVectorStack) -> TaskVectorStack:
    """One tensor's Iso-CTS pieces in place of its task vectors, (k, *S) dense (module docstring)."""
    deltas = dense_stack(stack)
    dtype = stack.B.dtype if isinstance(stack, FactoredStack) else stack.dtype
    k = deltas.shape[0]
    if deltas.dim() != 3:
        return (deltas / k).to(dtype)
    left, right, owner = iso.iso_cts_components(deltas, ISO_CTS_FRACTION)
    del deltas
    shared = owner < 0
    common = (left[:, shared] @ right[shared]) / k
    pieces = torch.stack([common + left[:, owner == i] @ right[owner == i] for i in range(k)])
    return pieces.to(dtype)


def to_basis(stacked: dict[str, TaskVectorStack], basis: str) -> dict[str, TaskVectorStack]:
    """``stacked`` over ``basis`` (task_vectors: unchanged; tsv: ``tsv_pieces`` per tensor; iso_cts:
    ``iso_cts_pieces``; compressed: unchanged, the task vectors were compressed before they were
    stacked, ``compress_inputs``). Replaces the stacks in ``stacked`` one tensor at a time and returns
    it, so a dense basis (iso_cts) holds one tensor's task vectors and pieces at once, not two stacks."""
    if basis in ("task_vectors", "compressed"):
        return stacked
    pieces = tsv_pieces if basis == "tsv" else iso_cts_pieces
    for n in list(stacked):
        stacked[n] = pieces(stacked[n])
    return stacked


def compress_inputs(vectors: Sequence[TaskVector], config: LearnedMergeConfig, *,
                    release: bool = False) -> list[TaskVector]:
    """The inputs as ``config.basis`` weights them: compressed (supermerge.merge_core.compress, ``config.rank``)
    under basis compressed, else as given. Compressing is idempotent (compact deltas stay), so a node
    runner that compressed each task vector as it loaded it (to hold one dense one at a time) passes
    them on unchanged. ``release``: empty the given vectors' deltas, which the compressed ones replace."""
    if config.basis != "compressed":
        return list(vectors)
    out = [compress_task_vector(v, len(vectors), config.rank) for v in vectors]
    if release:
        for v in vectors:
            v.deltas.clear()
    return out


def rescaled(stack: TaskVectorStack, factor: float) -> TaskVectorStack:
    """``factor`` times the stack: a factored stack changes only its per-rank scale (a new one), a
    dense one is scaled in place (a copy would hold a second stack of every tensor)."""
    if isinstance(stack, FactoredStack):
        return FactoredStack(stack.B, stack.A, stack.owner, stack.scale * factor, stack.k)
    return stack.mul_(factor)


@torch.no_grad()
def search_start_scale(
    model: FunctionalModel,
    base: Mapping[str, Tensor],
    stacked: Mapping[str, TaskVectorStack],
    heads: Mapping[str, Mapping[str, Tensor]],
    data: Mapping[str, TaskData],
    grid: tuple[float, ...],
) -> tuple[float, list[dict[str, float]]]:
    """The scale s of ``grid`` whose merge ``base + s * sum_i basis_i`` has the best mean validation
    accuracy (ties: lower loss), as the per-tensor grid search chooses, and every point's scores."""
    k = next(iter(stacked.values())).shape[0]
    group_of = {n: 0 for n in stacked}
    best: tuple[float, float] | None = None
    chosen, search = grid[0], []
    for scale in grid:
        params = combine(base, stacked, torch.full((k, 1), scale, device=model.device), group_of)
        scores = [task_scores(model, params, heads[t], d) for t, d in data.items()]
        acc = sum(s[0] for s in scores) / len(scores)
        loss = sum(s[1] for s in scores) / len(scores)
        search.append({"scale": scale, "val_accuracy": acc, "val_loss": loss})
        if best is None or (acc, -loss) > best:
            best, chosen = (acc, -loss), scale
    return chosen, search

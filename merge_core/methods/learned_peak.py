"""A learned merge's peak memory (``supermerge.merge_core.methods.learned``), per term, before it runs.

Beyond eq. 6 (``supermerge.merge_core.peak``) a learned merge holds:

- the stacked task vectors, ``(k, *shape)`` per tensor, beyond the loaded ones: the node runner moves
  each loaded delta into its stack, so for full fine-tunes they are paid once (adapters, loaded
  compact, are stacked dense unless LoRA factors are smaller);
- the merged parameters ``theta_p + sum_i f(W_i) tau_i``, built once per training step;
- the gradients w.r.t. them: by default (``backward: per_task``) each task's batch runs forward and
  backward alone and its gradient w.r.t. the merged tensors is accumulated, so a whole model's worth
  is held; with ``backward: joint`` they pass through one tensor at a time (the largest, the
  embedding matrix, held whole);
- the activations autograd keeps for one step: one task's batch at a time by default, so they follow
  the largest batch, not the number of tasks beneath the node; with ``backward: joint`` every task's
  batch runs before the single backward and they grow with the tasks;
- a small constant for what is in flight besides (``peak.RUNTIME_BYTES``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from supermerge.merge_core.compress import compressed_values, stacked_values
from supermerge.merge_core.methods.learned import TRANSFER_CHUNK
from supermerge.merge_core.peak import FP32, RUNTIME_BYTES, Device, ModelShape, PeakBytes, Term, activation_bytes

ON_DEVICE: tuple[Term, ...] = ("model_weights", "merge_weight_grads", "optimizer_state", "merge_weights",
                               "stacked_task_vectors", "merged_params", "merged_param_grads", "activations")
"""What a learned merge on a GPU keeps there; the loaded task vectors and the runtime stay on the host."""


@dataclass(frozen=True)
class LearnedWorkload:
    """One learned merge node: ``k`` inputs whose loaded task vectors hold ``loaded_values`` fp32 values
    (k * N for full fine-tunes; adapters stay compact), ``n_groups`` merge weights per input (G), and
    one ``(examples, sequence length)`` batch per task it trains on, per step."""

    k: int
    loaded_values: int
    n_groups: int
    batches: tuple[tuple[int, int], ...]
    per_task_backward: bool = True
    """The ``backward`` setting: per_task (the default) or joint."""
    stack_bytes_per_value: int = FP32
    """Bytes per value of the stacked task vectors (``storage_dtype``: 2 for bf16/fp16). LoRA adapters'
    factored stacks are counted as dense, an upper bound."""
    stack_values: int | None = None
    """Values the stacks hold in all; None: ``k * N``, dense. Compressed task vectors
    (supermerge.merge_core.compress) are stacked factored, ``compressed_stack_values``."""

    def _host(self, shape: ModelShape) -> PeakBytes:
        n = shape.n_params
        trainable = self.k * self.n_groups
        per_batch = [activation_bytes(shape, b, s) for b, s in self.batches]
        return PeakBytes(
            model_weights=FP32 * n,
            merge_weight_grads=FP32 * trainable,
            optimizer_state=2 * FP32 * trainable,
            task_vectors=FP32 * self.loaded_values,
            merge_weights=FP32 * trainable,
            # the node runner drops each loaded delta once it is stacked: only what the stacks hold beyond
            # the loaded task vectors (adapters stacked dense) adds to the peak
            stacked_task_vectors=max(0, self.stack_bytes_per_value * self._stack(shape) - FP32 * self.loaded_values),
            merged_params=FP32 * n,
            merged_param_grads=FP32 * (n if self.per_task_backward else shape.largest_tensor),
            activations=max(per_batch, default=0) if self.per_task_backward else sum(per_batch),
            runtime=RUNTIME_BYTES,
        )

    def _stack(self, shape: ModelShape) -> int:
        return self.k * shape.n_params if self.stack_values is None else self.stack_values

    def peak(self, shape: ModelShape, device: Device = "cpu") -> PeakBytes:
        terms = self._host(shape)
        if device == "cuda":
            # the stacks are built on the GPU while the loaded deltas they replace are on the host
            terms = dataclasses.replace(terms, stacked_task_vectors=self.stack_bytes_per_value * self._stack(shape))
        return terms.on(device, ON_DEVICE)

    def offloaded_peak(self, shape: ModelShape) -> PeakBytes:
        """On a GPU, the stacks in host memory, copied over chunk by chunk each step (``_ChunkedSum``):
        one k-row chunk, in fp32 and as its source, is on the GPU."""
        chunk = self.k * min(TRANSFER_CHUNK, shape.largest_tensor)
        terms = dataclasses.replace(self._host(shape),
                                    transfer_buffers=FP32 * chunk + self.stack_bytes_per_value * chunk)
        return terms.on("cuda", tuple(t for t in ON_DEVICE if t != "stacked_task_vectors") + ("transfer_buffers",))


def _check_shapes(shape: ModelShape) -> None:
    if len(shape.tensor_shapes) != len(shape.tensor_names):
        raise ValueError("this ModelShape has no tensor_shapes; build it from the base's header to predict "
                         "compressed task vectors")


def compressed_loaded_values(shape: ModelShape, k: int, rank: int | None = None) -> int:
    """fp32 values one full fine-tune's task vector holds once compressed for a merge of ``k``
    (supermerge.merge_core.compress: its matrices as top-r factors, the rest dense)."""
    _check_shapes(shape)
    return sum(compressed_values(s, k, rank) for s in shape.tensor_shapes)


def compressed_stack_values(shape: ModelShape, k: int, rank: int | None = None) -> int:
    """Values a learned merge's stacks of ``k`` compressed task vectors hold (factored where smaller)."""
    _check_shapes(shape)
    return sum(stacked_values(s, k, rank) for s in shape.tensor_shapes)

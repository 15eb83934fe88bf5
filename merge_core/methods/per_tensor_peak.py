"""A per-tensor method's peak memory when it merges in memory (``supermerge.merge_core.merge``), per term.

It loads every task vector, stacks one tensor's k deltas at a time and applies the method's operator
(``MethodSpec.temporaries``: what the op allocates beyond its inputs). With several candidates (a grid
search on validation data) it also runs the model: the base, the current and the best merged model
(and, for a method affine in its scale, the unscaled merge direction), and one scoring batch without
gradients. Streamed merges, disk to disk, are ``supermerge.merge_core.stream_peak``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from supermerge.merge_core.methods.registry import Temporaries
from supermerge.merge_core.peak import FP32, RUNTIME_BYTES, Device, ModelShape, PeakBytes, Term, eval_activation_bytes

ON_DEVICE: tuple[Term, ...] = ("model_weights", "merged_params", "activations")
"""A per-tensor method merges on the host and only scores its candidates on the GPU."""


@dataclass(frozen=True)
class PerTensorWorkload:
    """One in-memory per-tensor merge node: ``k`` inputs whose loaded task vectors hold ``loaded_values``
    fp32 values, ``candidates`` grid points, and the ``(examples, sequence length)`` of each task's
    validation data it scores them on."""

    k: int
    loaded_values: int
    batches: tuple[tuple[int, int], ...] = ()
    candidates: int = 1
    """Grid-search candidates (the best one is kept beside the current one)."""
    scaled_search: bool = False
    """The method is affine in a scale parameter, so its grid search also holds the unscaled merge
    direction (supermerge.merge_core.merge's ``_grid_params``): a third model-sized copy."""
    temporaries: Temporaries = field(default_factory=Temporaries)
    """The op's temporaries (``MethodSpec.temporaries``)."""

    def peak(self, shape: ModelShape, device: Device = "cpu") -> PeakBytes:
        n = shape.n_params
        runs_model = bool(self.batches) or self.candidates > 1
        return PeakBytes(
            model_weights=FP32 * n if runs_model else 0,
            merge_weight_grads=0,
            optimizer_state=0,
            task_vectors=FP32 * self.loaded_values,
            merge_weights=0,
            stacked_task_vectors=FP32 * self.k * shape.largest_tensor,
            merged_params=FP32 * n * (1 if self.candidates == 1 else 3 if self.scaled_search else 2),
            merged_param_grads=0,
            activations=eval_activation_bytes(shape, self.batches) if runs_model else 0,
            runtime=RUNTIME_BYTES if runs_model else 0,
            op_temporaries=FP32 * self.temporaries.values(self.k, shape.largest_tensor),
        ).on(device, ON_DEVICE)

    def offloaded_peak(self, shape: ModelShape) -> None:
        """Nothing to offload: the task vectors are already on the host."""
        return None

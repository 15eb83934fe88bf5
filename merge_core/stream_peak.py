"""A streamed merge's peak memory (``supermerge.merge_core.stream``), per term: k copies of the largest
tensor, not k models.

A per-tensor method with fixed parameters is merged disk to disk one tensor at a time: it holds the
``(k, *shape)`` fp32 stack of the largest tensor, the op's temporaries on it, the base's copy as read
(widened to fp32 and cast back when stored narrower), adapters' compact deltas, and the input files'
pages it keeps mapped (unmapped after every ``stream.UNMAP_BYTES`` read). Nothing runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from supermerge.merge_core.methods.registry import Temporaries
from supermerge.merge_core.peak import FP32, Device, ModelShape, PeakBytes
from supermerge.merge_core.stream import UNMAP_BYTES

STREAM_RUNTIME_BYTES = 8 * 2**20
"""A streamed merge's small change: heads, the shard writer's header, the safetensors handles."""


@dataclass(frozen=True)
class StreamedWorkload:
    """One streamed merge node of ``k`` inputs; ``loaded_values`` counts only adapters' compact deltas
    (full models are read tensor by tensor)."""

    k: int
    loaded_values: int
    temporaries: Temporaries = field(default_factory=Temporaries)
    """The op's temporaries (``MethodSpec.temporaries``)."""
    io_bytes: int = 0
    """Tensors read and written beside the stack (``streamed_io_bytes``)."""
    mapped_bytes: int = 0
    """File pages held mapped at most (``streamed_mapped_bytes``)."""

    def peak(self, shape: ModelShape, device: Device = "cpu") -> PeakBytes:
        """On the host whatever ``device`` says: a streamed merge never uses an accelerator."""
        return PeakBytes(
            model_weights=0, merge_weight_grads=0, optimizer_state=0,
            task_vectors=FP32 * self.loaded_values,
            merge_weights=0,
            stacked_task_vectors=self.k * FP32 * shape.largest_tensor,
            merged_params=0,
            merged_param_grads=0, activations=0,
            op_temporaries=FP32 * self.temporaries.values(self.k, shape.largest_tensor),
            io_tensors=self.io_bytes,
            runtime=self.mapped_bytes + STREAM_RUNTIME_BYTES,
        )

    def offloaded_peak(self, shape: ModelShape) -> None:
        return None


def streamed_mapped_bytes(largest_tensor_bytes: int, k: int, input_bytes: int) -> int:
    """File pages a streamed merge of ``k`` inputs maps at most: it unmaps its inputs after every
    ``UNMAP_BYTES`` read, so that plus one tensor of each input, or all the input files where they are
    smaller. ``largest_tensor_bytes`` as stored, ``input_bytes`` the base's and the inputs' weight files."""
    return min(input_bytes, UNMAP_BYTES + (k + 1) * largest_tensor_bytes)


def streamed_io_bytes(largest_stored_bytes: int, largest_values: int) -> int:
    """Copies of the largest tensor a streamed merge holds beside its (k, *shape) fp32 stack: the
    base's tensor as read (every read is a copy), and, when it is stored narrower than fp32 (bf16,
    fp16), its fp32 widening in ``base + lam * direction`` and the result cast back to the stored dtype
    while the fp32 result is alive. Left out at first, these made a 1.1B-parameter bf16 TIES node of
    k = 4 measure 1.22x its prediction (bench/mergekit_bench.py)."""
    widened = FP32 * largest_values if largest_stored_bytes < FP32 * largest_values else 0
    return largest_stored_bytes + widened + (largest_stored_bytes if widened else 0)

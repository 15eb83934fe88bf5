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
- what the backward passes allocate beyond those at their worst moment (``backward_temporaries``): a
  causal LM's output-layer and word-embedding gradients, the products of the backward through factored
  stacks;
- a small constant for what is in flight besides (``peak.RUNTIME_BYTES``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from supermerge.merge_core.compress import compressed_rank, compressed_values, stacked_values
from supermerge.merge_core.methods.learned import TRANSFER_CHUNK
from supermerge.merge_core.peak import FP32, RUNTIME_BYTES, Device, ModelShape, PeakBytes, Term, activation_bytes

ON_DEVICE: tuple[Term, ...] = ("model_weights", "merge_weight_grads", "optimizer_state", "merge_weights",
                               "stacked_task_vectors", "merged_params", "merged_param_grads", "activations",
                               "backward_temporaries")
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
    factored_product_values: int = 0
    """``out * R`` of the largest factored stack (``FactoredStack``: B is (out, R)), whose backward
    forms two products of that size (``backward_temporaries``); 0 when every stack is dense.
    ``compressed_factored_product_values`` for compressed task vectors; LoRA adapters' stacks are left at 0
    (their R, the summed adapter ranks, is not read when planning; such products are at most their own
    small stacks)."""

    def _host(self, shape: ModelShape) -> PeakBytes:
        n = shape.n_params
        trainable = self.k * self.n_groups
        per_batch = [activation_bytes(shape, b, s) for b, s in self.batches]
        activations = max(per_batch, default=0) if self.per_task_backward else sum(per_batch)
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
            activations=activations,
            runtime=RUNTIME_BYTES,
            backward_temporaries=backward_temporary_bytes(shape, activations, self.factored_product_values)
            if self.batches else 0,
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


TIED_OUTPUT_GRAD_COPIES = 3
"""vocab x hidden fp32 gradients a causal LM with a tied output layer holds at the end of a task's
backward: the output layer's weight gradient (formed first, held until the word embedding's arrives,
since both are one tensor), the embedding's own dense gradient, and autograd's sum of the two. Measured
on one task's forward and backward with the merged tensors' gradients already held (RSS high-water mark
above the state before backward, batch 2 x 32 tokens): Qwen2-0.5B's shape (vocab 151,936, hidden 896)
1,572-1,582 MiB against 3 x 519 = 1,558 MiB; shrunk Qwen2s of vocab x hidden 32,000 x 256, 64,000 x 256
and 32,000 x 512: 103, 197 and 200 MiB against 94, 188 and 188 (the rest: the logits' gradient). Untied,
the same 32,000 x 256 model measured 49 MiB: one such gradient beside the activations."""


def output_layer_grad_bytes(shape: ModelShape) -> int:
    """One vocab x hidden fp32 gradient: a causal LM's output layer's weight (0 for classification,
    whose word embedding's gradient at the end of backward ``peak.RUNTIME_BYTES`` covers)."""
    return FP32 * shape.vocab * shape.hidden if shape.kind == "causal_lm" else 0


def backward_temporary_bytes(shape: ModelShape, activations: int, factored_product_values: int = 0) -> int:
    """What a training step's backward passes hold beyond ``activations`` (and the merged tensors'
    gradients, ``merged_param_grads``) at their worst moment, in bytes.

    Two moments compete, and the term is the larger, less the activations they include:

    - a task's backward through a causal LM: the output layer's weight gradient (``VH`` =
      ``output_layer_grad_bytes``) is formed as backward starts, beside the activations; tied to the word
      embedding it is held to the end of backward, where the embedding's gradient and their sum join it
      (``TIED_OUTPUT_GRAD_COPIES``), the activations freed by then: ``max(activations + VH, 3 VH)``;
      untied ``activations + VH``. Left out, a k = 32 merge of a shrunk Qwen2 measured 1.35x its
      prediction (bench/moonshot.py --small).
    - the backward through the merge to W, after every task's: a factored stack's ``(B * c) @ A`` gives
      ``grad @ A^T`` and ``B *`` that, two ``(out, R)`` fp32 products of the largest factored stack
      (measured: 62.6 MiB for a 32,000 x 256 embedding's R = 256, against 2 x 31.25).

    With ``backward: joint`` the same bound is used (one of the output gradients is then also counted
    in ``merged_param_grads``; measured only for per-task backward)."""
    vh = output_layer_grad_bytes(shape)
    task = max(activations + vh, TIED_OUTPUT_GRAD_COPIES * vh) if shape.tied_embeddings else activations + vh
    merge = 2 * FP32 * factored_product_values
    return max(task, merge, activations) - activations


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


def compressed_factored_product_values(shape: ModelShape, k: int, rank: int | None = None) -> int:
    """``out * R`` of the largest factored stack of ``k`` compressed task vectors (R = k * r), the size
    of each product its backward forms (``backward_temporary_bytes``); 0 when every stack is dense."""
    _check_shapes(shape)
    best = 0
    for s in shape.tensor_shapes:
        r = compressed_rank(s, k, rank)
        if r and stacked_values(s, k, rank) < k * s[0] * s[1]:
            best = max(best, s[0] * k * r)
    return best

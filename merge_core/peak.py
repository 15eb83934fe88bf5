"""What a merge node holds at its peak: the model as the predictions see it, the typed terms, activations.

The paper's eq. 6 gives a learned merge's peak as ``4 N_params + 4 N_trainable + 8 N_trainable +
4 k N_task_vector`` bytes: the frozen model, W's gradients and AdamW's two moments, and the k task
vectors. Running a merge holds more, and each engine's formula counts that too, next to the engine:
``merge_core.methods.learned_peak`` (a learned merge), ``merge_core.methods.per_tensor_peak`` (a
per-tensor method in memory, with or without a grid search) and ``merge_core.stream_peak`` (a per-tensor
method streamed disk to disk). This module holds what they share: the model's shape, the terms
(``PeakBytes``) and the activations autograd keeps.

Everything is fp32 (merge_core computes in fp32 whatever the checkpoints' dtype). The activation term
is counted, not fitted (see ACTIVATION_VALUES_PER_HIDDEN); ``bench/memory_bench.py`` prints measured /
predicted per node, which should sit a little below 1. Pure arithmetic: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

FP32 = 4
"""Bytes per value: merge_core holds task vectors, W and the merged model in fp32."""

ACTIVATION_VALUES_PER_HIDDEN = 8
ACTIVATION_VALUES_PER_INTERMEDIATE = 2
ACTIVATION_VALUES_EMBEDDING = 2
"""fp32 values autograd keeps per token: ``8 * hidden + 2 * intermediate`` per layer, plus
``2 * hidden`` for the embeddings. By hand, a BERT layer saves about 8 hidden-wide tensors (the
attention's input, Q, K, V and output, the LayerNorms' and the feed-forward's inputs) and 2
intermediate-wide ones (GELU's input and output); PyTorch's fused CPU attention keeps no seq x seq
matrix. Counted exactly with ``torch.autograd.graph.saved_tensors_hooks`` on the packaged MiniLM
(hidden 384, intermediate 1536, 6 layers): 37,740 values per token for batches of 16x64, 16x32,
8x128 and 32x16 tokens, against 37,632 by this formula (tests/orchestrator/test_memory.py checks the
tiny test BERT the same way)."""

EVAL_BATCH = 64
"""merge_core scores the merged model in batches of 64 examples without gradients."""

RUNTIME_BYTES = 32 * 2**20
"""What a node that runs the model adds beyond the tensors counted here: gradients of activations in
flight during backward, temporaries of the op at the peak, small blocks on the heap. Measured on the
packaged MiniLM (CPU, one thread, model code imported while planning, the allocator set by
``supermerge.orchestrator.measure.return_large_blocks_promptly``): whole predictions sat 1-10 % above the
measured peaks of all 28 nodes of ``bench/memory_bench.py`` (k = 4, 8, 16; flat and fan-in 2), i.e.
the counted tensors alone already cover them; ``merged_param_grads`` is the likely excess (the
embedding's gradient arrives at the end of backward, when most activations are freed). Kept as a
margin, not fitted."""

Device = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class ModelShape:
    """The base model as the planner sees it, from the checkpoint's header and ``config.json`` only.

    ``n_params``: floating-point values of the base (the length of one task vector, N);
    ``largest_tensor``: values in its biggest tensor; ``tensor_names``: its mergeable tensors.
    """

    n_params: int
    largest_tensor: int
    tensor_names: tuple[str, ...]
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    kind: Literal["classification", "causal_lm"] = "classification"
    tensor_shapes: tuple[tuple[int, ...], ...] = ()
    """The shape of each of ``tensor_names`` (what compressed task vectors keep depends on it)."""
    tied_embeddings: bool = False
    """A causal LM whose output layer is its word embedding (config.json's ``tie_word_embeddings``):
    the backward pass then holds that matrix's gradient from the output layer until the embedding's own
    arrives (``merge_core.methods.learned_peak.output_layer_grad_bytes``)."""


Term = Literal["model_weights", "merge_weight_grads", "optimizer_state", "task_vectors", "merge_weights",
               "stacked_task_vectors", "merged_params", "merged_param_grads", "activations", "runtime",
               "op_temporaries", "io_tensors", "transfer_buffers", "backward_temporaries"]
"""The name of one of PeakBytes' terms (what ``device_terms`` lists)."""


@dataclass(frozen=True)
class PeakBytes:
    """A node's predicted peak, per term (bytes). The first four are the paper's eq. 6. Kept typed
    through planning; ``to_dict`` is what crosses into JSON (a NodeTask's dict, the merge report)."""

    model_weights: int
    """eq. 6, 4 N_params: the frozen base model the merged forward runs in (held once)."""
    merge_weight_grads: int
    """eq. 6, 4 N_trainable: the gradient of W (k x G)."""
    optimizer_state: int
    """eq. 6, 8 N_trainable: AdamW's two moments of W."""
    task_vectors: int
    """eq. 6, 4 k N_task_vector: the k loaded task vectors."""
    merge_weights: int
    """W itself (k x G)."""
    stacked_task_vectors: int
    """The (k, *shape) stacks beyond the loaded task vectors: a learned merge in a node moves each
    loaded delta into its stack (so for full fine-tunes in fp32 this is 0, and the task vectors are
    counted once, in ``task_vectors``; adapters' dense stacks add their full size); a per-tensor method
    stacks one tensor at a time."""
    merged_params: int
    """The merged model built each step (two of them during a grid search: current and best)."""
    merged_param_grads: int
    """Gradients w.r.t. the merged tensors: all of them, accumulated over the tasks (per-task
    backward), or the largest tensor's, held whole while it passes (joint backward)."""
    activations: int
    """What autograd keeps for one step: the largest task batch (per-task backward), every task's
    batch (joint backward), or one scoring batch without grad."""
    runtime: int
    """Running a model's working memory beyond tensors (see RUNTIME_BYTES)."""
    op_temporaries: int = 0
    """A per-tensor method's working copies while it merges the largest tensor (``MethodSpec.temporaries``:
    TIES' trimmed copy, masks and sign election; DARE's masks), its result included."""
    io_tensors: int = 0
    """A streamed merge's copies of the largest tensor beside its stack: the base's as read, its fp32
    widening and the result cast back to the stored dtype (``stream_peak.streamed_io_bytes``)."""
    backward_temporaries: int = 0
    """What a learned merge's backward passes allocate beyond ``activations`` and ``merged_param_grads``
    at their worst moment: a causal LM's output-layer and embedding gradients (vocab x hidden each),
    and the products the backward through factored stacks forms (``merge_core.methods.learned_peak``)."""
    transfer_buffers: int = 0
    """On a GPU whose task vectors stay in host memory: the fp32 chunk of every model's task vector
    that each step copies to the GPU (supermerge.merge_core.methods.learned._ChunkedSum), with its source copy."""
    device_terms: frozenset[Term] = frozenset()
    """Terms that live on the node's accelerator; the rest are host RAM. Empty on CPU."""

    @property
    def eq6(self) -> int:
        return self.model_weights + self.merge_weight_grads + self.optimizer_state + self.task_vectors

    def terms(self) -> dict[Term, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "device_terms"}

    @property
    def total(self) -> int:
        return sum(self.terms().values())

    @property
    def device_bytes(self) -> int:
        return sum(v for k, v in self.terms().items() if k in self.device_terms)

    @property
    def host_bytes(self) -> int:
        return self.total - self.device_bytes

    @property
    def peak(self) -> int:
        """What the node's measured peak is compared with: the device's share on a GPU, else all."""
        return self.device_bytes if self.device_terms else self.total

    def on(self, device: Device, terms: Sequence[Term]) -> PeakBytes:
        """This prediction with ``terms`` on the accelerator when ``device`` is 'cuda' (else as it is)."""
        return dataclasses.replace(self, device_terms=frozenset(terms)) if device == "cuda" else self

    def to_dict(self) -> dict[str, int | list[str]]:
        """The terms and their sums, and which terms are on the device: JSON, read back by ``from_dict``."""
        return {**self.terms(), "eq6": self.eq6, "total": self.total, "device": self.device_bytes,
                "host": self.host_bytes, "peak": self.peak, "device_terms": sorted(self.device_terms)}

    @classmethod
    def from_dict(cls, raw: dict[str, int | list[str]]) -> PeakBytes:
        """The prediction ``to_dict`` wrote (its sums are recomputed, not read)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"device_terms"}
        return cls(**{n: int(v) for n, v in raw.items() if n in names},  # type: ignore[arg-type]
                   device_terms=frozenset(raw.get("device_terms", ())))  # type: ignore[arg-type]


class Workload(Protocol):
    """One merge node's size as its engine's formula needs it; each engine's module defines one."""

    k: int

    def peak(self, shape: ModelShape, device: Device = "cpu") -> PeakBytes:
        """The node's predicted peak on ``device``."""
        ...

    def offloaded_peak(self, shape: ModelShape) -> PeakBytes | None:
        """On a GPU with the stacked task vectors in host memory; None when the engine cannot."""
        ...


def activation_bytes(shape: ModelShape, examples: int, seq_len: int) -> int:
    """Bytes autograd keeps for one batch of ``examples`` x ``seq_len`` tokens through the model."""
    per_token = (shape.layers * (ACTIVATION_VALUES_PER_HIDDEN * shape.hidden
                                 + ACTIVATION_VALUES_PER_INTERMEDIATE * shape.intermediate)
                 + ACTIVATION_VALUES_EMBEDDING * shape.hidden)
    total = examples * seq_len * per_token
    if shape.kind == "causal_lm":
        total += 3 * examples * seq_len * shape.vocab  # logits, their log-softmax and its gradient
    return int(FP32 * total)


def eval_activation_bytes(shape: ModelShape, batches: Sequence[tuple[int, int]]) -> int:
    """Scoring without gradients keeps about one layer's tensors of one batch alive at a time."""
    if not batches:
        return 0
    seq = max(s for _, s in batches)
    rows = min(EVAL_BATCH, max(n for n, _ in batches))
    per_token = 4 * shape.hidden + 2 * shape.intermediate + shape.heads * seq
    extra = rows * seq * shape.vocab if shape.kind == "causal_lm" else 0
    return int(FP32 * (rows * seq * per_token + extra))

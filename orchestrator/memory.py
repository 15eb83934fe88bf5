"""The memory planner: each merge node's peak before it runs, what is free, and where each node fits.

The paper's eq. 6 gives a learned merge's peak as ``4 N_params + 4 N_trainable + 8 N_trainable +
4 k N_task_vector`` bytes: the frozen model, W's gradients and AdamW's two moments, and the k task
vectors. Running it (supermerge.merge_core.merge) holds more, and ``predict_node_peak_bytes`` counts that too:

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
- a small constant for what is in flight besides (activation gradients during backward, temporaries).

The model's code, which a process imports once (75-130 MB for BERT), is imported while planning
(``load_model_code``), so it is part of what the process already uses when the budget is set rather
than of the first node's peak. Everything is fp32 (merge_core computes in fp32 whatever the
checkpoints' dtype). The activation term is counted, not fitted (see ACTIVATION_VALUES_PER_HIDDEN);
``bench/memory_bench.py`` prints measured / predicted per node, which should sit a little below 1.

What is free comes from psutil (RAM) and pynvml (each NVIDIA GPU). No GPU, or no pynvml, is fine: the
inventory says why none is listed. The budget defaults to a safe fraction of what is free.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil

from supermerge.merge_core.checkpoint import config_dir, open_checkpoint
from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.methods.registry import Temporaries
from supermerge.merge_core.task_vectors import mergeable_names
from supermerge.orchestrator.errors import MemoryBudgetError

log = logging.getLogger(__name__)

FP32 = 4
"""Bytes per value: merge_core holds task vectors, W and the merged model in fp32."""

SAFE_RAM_FRACTION = 0.8
"""Default host budget: this share of the RAM psutil reports available, so the page cache, allocator
slack and the prediction's error (measured within -20 %..+10 %) still fit."""

SAFE_GPU_FRACTION = 0.9
"""Default GPU budget: this share of each GPU's free memory (the CUDA context and the caching
allocator's slack are outside ``max_memory_allocated``)."""

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


STREAM_RUNTIME_BYTES = 8 * 2**20
"""A streamed merge's small change: heads, the shard writer's header, the safetensors handles."""


# --- what the planner knows about the model and one node ------------------------------------------


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


def _config_value(config: Any, names: Sequence[str], what: str, folder: Path) -> int:
    for n in names:
        value = getattr(config, n, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(
        f"{folder}/config.json gives no {what} (looked for {list(names)}); the memory planner needs it "
        "to size the activations"
    )


def load_model_code(base: str | os.PathLike[str], kind: Literal["classification", "causal_lm"]) -> None:
    """Import the model's code now, while planning, by building it on the meta device (no weights).

    The first model a process builds imports transformers' modeling code for it, which holds 75-130 MB
    for the rest of the process (BERT, transformers 5). Done here, before the inventory is read, that
    memory is part of what the process already uses when the budget is set, and no merge node's
    measured peak carries it (otherwise only the first node in each process would)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from supermerge.merge_core.model import _quiet_transformers

    folder = config_dir(base)
    if folder is None:
        return
    auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
    with torch.device("meta"), _quiet_transformers():
        auto.from_config(AutoConfig.from_pretrained(folder))


def model_shape(base: str | os.PathLike[str], kind: Literal["classification", "causal_lm"]) -> ModelShape:
    """Read the base's tensor sizes (header) and its layers/hidden/heads (``config.json``)."""
    from transformers import AutoConfig

    with open_checkpoint(base) as ckpt:
        names = tuple(mergeable_names(ckpt))
        shapes = tuple(tuple(ckpt.shape(n)) for n in names)
        sizes = [math.prod(shape) for shape in shapes]
    folder = config_dir(base)
    if folder is None:
        raise ConfigError(
            f"{base}: the memory planner needs the model's config.json beside the weights (layers, "
            "hidden size, heads) to predict activation memory"
        )
    config = AutoConfig.from_pretrained(folder)
    text = getattr(config, "text_config", None) or config
    hidden = _config_value(text, ("hidden_size", "d_model", "n_embd"), "hidden size", folder)
    intermediate_names = ("intermediate_size", "d_ff", "n_inner", "ffn_dim")
    has_intermediate = any(isinstance(getattr(text, n, None), int) for n in intermediate_names)
    return ModelShape(
        n_params=sum(sizes),
        largest_tensor=max(sizes),
        tensor_names=names,
        layers=_config_value(text, ("num_hidden_layers", "num_layers", "n_layer"), "layer count", folder),
        hidden=hidden,
        heads=_config_value(text, ("num_attention_heads", "num_heads", "n_head"), "head count", folder),
        intermediate=(_config_value(text, intermediate_names, "intermediate size", folder)
                      if has_intermediate else 4 * hidden),
        vocab=_config_value(text, ("vocab_size",), "vocabulary size", folder),
        kind=kind,
        tensor_shapes=shapes,
    )


@dataclass(frozen=True)
class NodeWorkload:
    """One merge node's size: ``k`` inputs whose loaded task vectors hold ``loaded_values`` fp32 values
    (k * N for full fine-tunes; adapters stay compact), ``n_groups`` merge weights per input (G), and
    one ``(examples, sequence length)`` batch per task it trains on, per step."""

    k: int
    loaded_values: int
    n_groups: int
    batches: tuple[tuple[int, int], ...]
    learned: bool = True
    per_task_backward: bool = True
    """A learned merge's ``backward`` setting: per_task (the default) or joint."""
    candidates: int = 1
    """Grid-search candidates of a per-tensor method (the best one is kept beside the current one)."""
    stack_bytes_per_value: int = FP32
    """Bytes per value of a learned merge's stacked task vectors (``storage_dtype``: 2 for bf16/fp16).
    LoRA adapters' factored stacks are counted as dense, an upper bound."""
    scaled_search: bool = False
    """The method is affine in a scale parameter, so its grid search also holds the unscaled merge
    direction (supermerge.merge_core.merge's ``_grid_params``): a third model-sized copy."""
    streamed: bool = False
    """A per-tensor method with fixed parameters, merged disk to disk one tensor at a time
    (supermerge.merge_core.stream): ``loaded_values`` then counts only adapters' compact deltas (full models are
    read tensor by tensor), and nothing runs the model."""
    temporaries: Temporaries = dataclasses.field(default_factory=Temporaries)
    """A per-tensor method's op temporaries (``MethodSpec.temporaries``)."""
    io_bytes: int = 0
    """Tensors a streamed merge reads and writes beside its stack (``streamed_io_bytes``)."""
    stack_values: int | None = None
    """Values a learned merge's stacks hold in all; None: ``k * N``, dense. Compressed task vectors
    (supermerge.merge_core.compress) are stacked factored, ``compressed_stack_values``."""
    mapped_bytes: int = 0
    """File pages a streamed merge holds mapped at most: it unmaps its inputs after every
    ``supermerge.merge_core.stream.UNMAP_BYTES`` read, so that plus one tensor of each input, or all the input
    files where they are smaller (``streamed_mapped_bytes``)."""


@dataclass(frozen=True)
class PeakBytes:
    """A node's predicted peak, per term (bytes). The first four are the paper's eq. 6."""

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
    widening and the result cast back to the stored dtype (``streamed_io_bytes``)."""
    transfer_buffers: int = 0
    """On a GPU whose task vectors stay in host memory: the fp32 chunk of every model's task vector
    that each step copies to the GPU (supermerge.merge_core.methods.learned._ChunkedSum), with its source copy."""
    device_terms: tuple[str, ...] = ()
    """Terms that live on the node's accelerator; the rest are host RAM. Empty on CPU."""

    @property
    def eq6(self) -> int:
        return self.model_weights + self.merge_weight_grads + self.optimizer_state + self.task_vectors

    def terms(self) -> dict[str, int]:
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

    def to_dict(self) -> dict[str, int]:
        return {**self.terms(), "eq6": self.eq6, "total": self.total, "device": self.device_bytes,
                "host": self.host_bytes, "peak": self.peak}


def streamed_mapped_bytes(largest_tensor_bytes: int, k: int, input_bytes: int) -> int:
    """File pages a streamed merge of ``k`` inputs maps at most (see ``NodeWorkload.mapped_bytes``):
    ``largest_tensor_bytes`` as stored, ``input_bytes`` the base's and the inputs' weight files."""
    from supermerge.merge_core.stream import UNMAP_BYTES

    return min(input_bytes, UNMAP_BYTES + (k + 1) * largest_tensor_bytes)


def streamed_io_bytes(largest_stored_bytes: int, largest_values: int) -> int:
    """Copies of the largest tensor a streamed merge holds beside its (k, *shape) fp32 stack: the
    base's tensor as read (every read is a copy), and, when it is stored narrower than fp32 (bf16,
    fp16), its fp32 widening in ``base + lam * direction`` and the result cast back to the stored dtype
    while the fp32 result is alive. Left out at first, these made a 1.1B-parameter bf16 TIES node of
    k = 4 measure 1.22x its prediction (bench/mergekit_bench.py)."""
    widened = FP32 * largest_values if largest_stored_bytes < FP32 * largest_values else 0
    return largest_stored_bytes + widened + (largest_stored_bytes if widened else 0)


def activation_bytes(shape: ModelShape, examples: int, seq_len: int) -> int:
    """Bytes autograd keeps for one batch of ``examples`` x ``seq_len`` tokens through the model."""
    per_token = (shape.layers * (ACTIVATION_VALUES_PER_HIDDEN * shape.hidden
                                 + ACTIVATION_VALUES_PER_INTERMEDIATE * shape.intermediate)
                 + ACTIVATION_VALUES_EMBEDDING * shape.hidden)
    total = examples * seq_len * per_token
    if shape.kind == "causal_lm":
        total += 3 * examples * seq_len * shape.vocab  # logits, their log-softmax and its gradient
    return int(FP32 * total)


def _eval_activation_bytes(shape: ModelShape, batches: Sequence[tuple[int, int]]) -> int:
    """Scoring without gradients keeps about one layer's tensors of one batch alive at a time."""
    if not batches:
        return 0
    seq = max(s for _, s in batches)
    rows = min(EVAL_BATCH, max(n for n, _ in batches))
    per_token = 4 * shape.hidden + 2 * shape.intermediate + shape.heads * seq
    extra = rows * seq * shape.vocab if shape.kind == "causal_lm" else 0
    return int(FP32 * (rows * seq * per_token + extra))


def predict_node_peak_bytes(
    shape: ModelShape, work: NodeWorkload, device: Literal["cpu", "cuda"] = "cpu", *, offload: bool = False
) -> PeakBytes:
    """Predict a node's peak memory, per term (see the module docstring). ``offload``: on a GPU, the
    stacked task vectors stay in host memory and are copied over chunk by chunk each step."""
    n = shape.n_params
    stack = work.k * n if work.stack_values is None else work.stack_values
    trainable = work.k * work.n_groups if work.learned else 0
    if work.streamed:
        tensor = FP32 * shape.largest_tensor
        return PeakBytes(
            model_weights=0, merge_weight_grads=0, optimizer_state=0,
            task_vectors=FP32 * work.loaded_values,
            merge_weights=0,
            stacked_task_vectors=work.k * tensor,
            merged_params=0,
            merged_param_grads=0, activations=0,
            op_temporaries=FP32 * work.temporaries.values(work.k, shape.largest_tensor),
            io_tensors=work.io_bytes,
            runtime=work.mapped_bytes + STREAM_RUNTIME_BYTES,
        )
    if work.learned:
        per_batch = [activation_bytes(shape, b, s) for b, s in work.batches]
        acts = max(per_batch, default=0) if work.per_task_backward else sum(per_batch)
        terms = PeakBytes(
            model_weights=FP32 * n,
            merge_weight_grads=FP32 * trainable,
            optimizer_state=2 * FP32 * trainable,
            task_vectors=FP32 * work.loaded_values,
            merge_weights=FP32 * trainable,
            # the node runner drops each loaded delta once it is stacked: only what the stacks hold beyond
            # the loaded task vectors (adapters stacked dense) adds to the peak
            stacked_task_vectors=max(0, work.stack_bytes_per_value * stack - FP32 * work.loaded_values),
            merged_params=FP32 * n,
            merged_param_grads=FP32 * (n if work.per_task_backward else shape.largest_tensor),
            activations=acts,
            runtime=RUNTIME_BYTES,
        )
    else:
        runs_model = bool(work.batches) or work.candidates > 1
        terms = PeakBytes(
            model_weights=FP32 * n if runs_model else 0,
            merge_weight_grads=0,
            optimizer_state=0,
            task_vectors=FP32 * work.loaded_values,
            merge_weights=0,
            stacked_task_vectors=FP32 * work.k * shape.largest_tensor,
            merged_params=FP32 * n * (1 if work.candidates == 1 else 3 if work.scaled_search else 2),
            merged_param_grads=0,
            activations=_eval_activation_bytes(shape, work.batches) if runs_model else 0,
            runtime=RUNTIME_BYTES if runs_model else 0,
            op_temporaries=FP32 * work.temporaries.values(work.k, shape.largest_tensor),
        )
    if device == "cuda":
        # a per-tensor method merges on the host and only scores its candidates on the GPU
        on_device = (("model_weights", "merge_weight_grads", "optimizer_state", "merge_weights",
                      "stacked_task_vectors", "merged_params", "merged_param_grads", "activations")
                     if work.learned else ("model_weights", "merged_params", "activations"))
        if work.learned and not offload:
            # the stacks are built on the GPU while the loaded deltas they replace are on the host
            terms = dataclasses.replace(terms, stacked_task_vectors=work.stack_bytes_per_value * stack)
        if offload:
            from supermerge.merge_core.methods.learned import TRANSFER_CHUNK

            on_device = tuple(t for t in on_device if t != "stacked_task_vectors") + ("transfer_buffers",)
            chunk = work.k * min(TRANSFER_CHUNK, shape.largest_tensor)
            terms = dataclasses.replace(terms, transfer_buffers=FP32 * chunk + work.stack_bytes_per_value * chunk)
        terms = dataclasses.replace(terms, device_terms=on_device)
    return terms


# --- what is free, and the budget ------------------------------------------------------------------


@dataclass(frozen=True)
class GpuMemory:
    """One CUDA device as torch numbers it (``cuda:<index>``), from NVML."""

    index: int
    name: str
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class MemoryInventory:
    """What the machine has now. ``process_bytes``: RSS this process already uses (imports, data);
    ``gpu_note``: why no GPU is listed ('' when NVML answered)."""

    ram_available_bytes: int
    ram_total_bytes: int
    process_bytes: int
    gpus: tuple[GpuMemory, ...] = ()
    gpu_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _visible_nvml_indices(count: int, uuids: Sequence[str]) -> list[int] | str:
    """NVML indices of the GPUs torch sees, in torch's order, honouring CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    out = []
    for item in (v.strip() for v in visible.split(",") if v.strip()):
        if item.isdigit() and int(item) < count:
            out.append(int(item))
        elif item.startswith("GPU-") and any(u.startswith(item) for u in uuids):
            out.append(next(i for i, u in enumerate(uuids) if u.startswith(item)))
        elif item.isdigit() or item.startswith("-"):
            break  # CUDA stops at the first invalid entry
        else:
            return f"CUDA_VISIBLE_DEVICES={visible!r} names devices NVML cannot match (MIG?)"
    return out


def _gpu_inventory() -> tuple[tuple[GpuMemory, ...], str]:
    try:
        import pynvml
    except ImportError as e:
        return (), f"pynvml is not installed ({e}); install nvidia-ml-py to plan for GPUs"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return (), f"NVML did not start ({e}): no NVIDIA driver here"
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        order = _visible_nvml_indices(count, uuids)
        if isinstance(order, str):
            return (), order
        gpus = []
        for torch_index, nvml_index in enumerate(order):
            info = pynvml.nvmlDeviceGetMemoryInfo(handles[nvml_index])
            gpus.append(GpuMemory(torch_index, _text(pynvml.nvmlDeviceGetName(handles[nvml_index])),
                                  int(info.free), int(info.total)))
        return tuple(gpus), "" if gpus else "NVML lists no GPU"
    except pynvml.NVMLError as e:
        return (), f"NVML failed while listing GPUs ({e})"
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_inventory() -> MemoryInventory:
    """Free RAM (psutil) and free memory of each GPU (pynvml), now."""
    vm = psutil.virtual_memory()
    gpus, note = _gpu_inventory()
    if note:
        log.info("no GPU planned for: %s", note)
    return MemoryInventory(int(vm.available), int(vm.total), int(psutil.Process().memory_info().rss), gpus, note)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(text: str) -> int:
    """``'8GB'`` (10^9), ``'512MiB'`` (2^20), ``'1.5 GB'``, ``'1000000'`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"memory budget {text!r} is not a size; write e.g. '8GB', '512MiB' or a number of bytes"
        )
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"memory budget {text!r} must be positive")
    return value


def format_bytes(n: int | float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Budget:
    """Bytes one node may use: ``host`` RAM beyond what the process already holds, and per GPU
    (``gpus``: torch index -> bytes). ``source`` says where the numbers came from."""

    host: int
    gpus: dict[int, int] = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "gpus": {str(k): v for k, v in self.gpus.items()}, "source": self.source}


def make_budget(memory_budget: str | None, inventory: MemoryInventory) -> Budget:
    """The per-node budget: ``memory_budget`` caps the process's RAM (and each GPU's use); without it,
    a safe fraction of what is free (SAFE_RAM_FRACTION of available RAM, SAFE_GPU_FRACTION per GPU)."""
    gpu_free = {g.index: int(SAFE_GPU_FRACTION * g.free_bytes) for g in inventory.gpus}
    if memory_budget is None:
        return Budget(
            host=int(SAFE_RAM_FRACTION * inventory.ram_available_bytes),
            gpus=gpu_free,
            source=(f"{SAFE_RAM_FRACTION:.0%} of the {format_bytes(inventory.ram_available_bytes)} RAM "
                    f"available" + (f", {SAFE_GPU_FRACTION:.0%} of each GPU's free memory" if gpu_free else "")),
        )
    cap = parse_bytes(memory_budget)
    host = cap - inventory.process_bytes
    if host <= 0:
        raise MemoryBudgetError(
            f"memory budget {memory_budget} is below the {format_bytes(inventory.process_bytes)} this "
            "process already uses; raise --memory-budget"
        )
    if host > inventory.ram_available_bytes:
        log.warning("memory budget %s exceeds the %s RAM available now; planning with the budget as given",
                    memory_budget, format_bytes(inventory.ram_available_bytes))
    return Budget(
        host=host,
        gpus={i: min(cap, free) for i, free in gpu_free.items()},
        source=(f"memory budget {memory_budget} minus the {format_bytes(inventory.process_bytes)} this "
                "process already uses"),
    )


# --- checking a prediction against what a node measured ------------------------------------------

OVER_PREDICTION_SLACK_BYTES = 16 * 2**20
"""Readings within this of the prediction are never flagged: a process's RSS also moves by a few MB
of allocator slack and lazily imported code, which matters only next to a tiny node's prediction."""


def prediction_margin(device: str) -> float:
    """How far (a fraction) a node's measured peak may exceed its prediction before it eats the
    headroom the default budget leaves: ``1 / SAFE_RAM_FRACTION - 1`` (25 %) in RAM,
    ``1 / SAFE_GPU_FRACTION - 1`` (11 %) on a GPU."""
    fraction = SAFE_GPU_FRACTION if device.startswith("cuda") else SAFE_RAM_FRACTION
    return 1 / fraction - 1


def exceeds_prediction(measured_bytes: int, predicted_bytes: int, device: str) -> bool:
    """The measured peak is above the prediction by more than the planner's margin (and the slack)."""
    allowed = max(prediction_margin(device) * predicted_bytes, OVER_PREDICTION_SLACK_BYTES)
    return measured_bytes > predicted_bytes + allowed


# --- placing a node --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a node runs and its prediction there; ``device`` None when it fits nowhere."""

    device: str | None
    predicted: PeakBytes
    reason: str
    task_vector_device: str | None = None
    """'cpu' when the node runs on a GPU with its stacked task vectors in host memory."""


def place_node(
    shape: ModelShape, work: NodeWorkload, budget: Budget, requested: str
) -> Placement:
    """Put a node on ``requested`` ('cpu', 'cuda' = any GPU, 'cuda:N') if its prediction fits there.

    With 'cuda' (what ``device: auto`` resolves to on a GPU machine) the GPU with the most budget that
    fits is chosen, and a node no GPU can hold runs on the CPU when RAM can: the plan shows it. An
    explicit 'cuda:N' is held to that GPU.
    """
    cpu = predict_node_peak_bytes(shape, work, "cpu")
    gpu = predict_node_peak_bytes(shape, work, "cuda")
    offloaded = predict_node_peak_bytes(shape, work, "cuda", offload=True) if work.learned else None
    if requested.startswith("cuda"):
        indices = sorted(budget.gpus, key=lambda i: -budget.gpus[i])
        if ":" in requested:
            indices = [int(requested.split(":", 1)[1])]
        for i in indices:
            if gpu.device_bytes <= budget.gpus.get(i, 0) and gpu.host_bytes <= budget.host:
                return Placement(f"cuda:{i}", gpu, "fits the GPU")
        for i in indices:
            if (offloaded is not None and offloaded.device_bytes <= budget.gpus.get(i, 0)
                    and offloaded.host_bytes <= budget.host):
                return Placement(f"cuda:{i}", offloaded, "fits the GPU with its task vectors in host memory", "cpu")
        if ":" in requested:
            return Placement(None, gpu, f"needs {format_bytes(gpu.device_bytes)} on {requested}, budget "
                                        f"{format_bytes(budget.gpus.get(indices[0], 0))}")
        if cpu.total <= budget.host:
            return Placement("cpu", cpu, "too big for every GPU; fits RAM")
        return Placement(None, cpu, f"needs {format_bytes(gpu.device_bytes)} on a GPU (largest budget "
                                    f"{format_bytes(max(budget.gpus.values(), default=0))}) or "
                                    f"{format_bytes(cpu.total)} RAM (budget {format_bytes(budget.host)})")
    if cpu.total <= budget.host:
        return Placement("cpu", cpu, "fits RAM")
    return Placement(None, cpu, f"needs {format_bytes(cpu.total)} RAM, budget {format_bytes(budget.host)}")


def _check_shapes(shape: ModelShape) -> None:
    if len(shape.tensor_shapes) != len(shape.tensor_names):
        raise ValueError("this ModelShape has no tensor_shapes; build it with model_shape(base) to predict "
                         "compressed task vectors")


def compressed_loaded_values(shape: ModelShape, k: int, rank: int | None = None) -> int:
    """fp32 values one full fine-tune's task vector holds once compressed for a merge of ``k``
    (supermerge.merge_core.compress: its matrices as top-r factors, the rest dense)."""
    from supermerge.merge_core.compress import compressed_values

    _check_shapes(shape)
    return sum(compressed_values(s, k, rank) for s in shape.tensor_shapes)


def compressed_stack_values(shape: ModelShape, k: int, rank: int | None = None) -> int:
    """Values a learned merge's stacks of ``k`` compressed task vectors hold (factored where smaller)."""
    from supermerge.merge_core.compress import stacked_values

    _check_shapes(shape)
    return sum(stacked_values(s, k, rank) for s in shape.tensor_shapes)


def loaded_values(path: str | os.PathLike[str], n_params: int) -> int:
    """fp32 values a model's loaded task vector holds: N for a full model, the stored size of an
    adapter (read from its header)."""
    from supermerge.merge_core.adapters import adapter_weights_file, is_adapter_dir

    if not is_adapter_dir(path):
        return n_params
    with open_checkpoint(adapter_weights_file(Path(path))) as adapter:
        return adapter.numel()


def weight_file_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of a model's weight files (an adapter's adapter file), from the file system."""
    from supermerge.merge_core.adapters import adapter_weights_file, is_adapter_dir

    if is_adapter_dir(path):
        return adapter_weights_file(Path(path)).stat().st_size
    with open_checkpoint(path) as ckpt:
        return sum(f.stat().st_size for f in {ckpt.file_of(n) for n in ckpt.keys()})


def largest_tensor_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of a checkpoint's largest tensor as stored (its dtype, not fp32)."""
    with open_checkpoint(path) as ckpt:
        return max(math.prod(ckpt.shape(n)) * ckpt.dtype(n).itemsize for n in ckpt.keys())


def describe(predicted: PeakBytes, top: int = 3) -> str:
    """The largest terms, for error messages and the plan."""
    terms = sorted(predicted.terms().items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{name} {format_bytes(v)}" for name, v in terms)


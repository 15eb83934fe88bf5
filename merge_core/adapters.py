"""Task vectors of PEFT adapters (LoRA, IA3), kept in their compact form.

A LoRA adapter's task vector on a weight is ``scaling * B @ A`` (a ``LowRankDelta``); an IA3 adapter's
is ``W * (l - 1)`` along one axis (a ``ScaleDelta``). Both are read from ``adapter_model.safetensors``
as PEFT writes it (``base_model.model.<model prefix><module>.lora_A.weight``, ``...ia3_l``) and mapped
onto the BASE checkpoint's tensor names; ``modules_to_save`` tensors that are not base tensors (the
classifier) become the task's own head. The semantics follow PEFT 0.21's ``merge_and_unload``, which
the tests compare against. Everything that can be checked from the config and the file headers is
checked before a tensor is read, and all problems are reported together.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from supermerge.merge_core.checkpoint import Checkpoint, open_checkpoint
from supermerge.merge_core.deltas import Delta, LowRankDelta, ScaleDelta
from supermerge.merge_core.errors import TaskVectorError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

_MERGE_INSTEAD = (
    "merge it into its base with PEFT (PeftModel.from_pretrained(model, dir).merge_and_unload()"
    ".save_pretrained(out)) and give the merged model dir instead"
)

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
_IA3_KEY = re.compile(r"^(?P<module>.+)\.ia3_l$")
_SAVED_WRAPPER = re.compile(r"\.modules_to_save\.[^.]+\.")

_SAFE_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal")
"""``init_lora_weights`` values that leave the base weights untouched. PiSSA, OLoRA, CorDA, LoftQ,
LoRA-GA and MiCA rewrite the base (or the update rule), so ``B @ A`` alone is not the task vector."""

_LORA_VARIANTS: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config), which truncates the base weights",
    "arrow_config": "Arrow routing (arrow_config)",
    "megatron_config": "Megatron-parallel LoRA (megatron_config)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "lora_bias": "a trained LoRA bias (lora_bias)",
}
"""LoRA config fields whose truthy value makes the adapter something other than ``W + s * B @ A``."""


@dataclass
class AdapterTaskVector:
    """An adapter's task vector on the base's tensor names, and the head it brings along.

    ``deltas``: base tensor name -> ``LowRankDelta`` (LoRA), ``ScaleDelta`` (IA3) or a dense fp32
    tensor (a ``modules_to_save`` module that is part of the base); ``head``: the task's own
    ``modules_to_save`` tensors named as in the task model (``classifier.weight``), fp32, not merged.
    """

    deltas: dict[str, Delta]
    head: dict[str, Tensor]
    kind: Literal["lora", "ia3"]
    config: dict[str, Any]


@dataclass(frozen=True)
class _Target:
    """One adapted module: its name in the task model, the base weight it changes, its file keys."""

    module: str
    weight: str
    keys: Mapping[str, str]


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """True for a directory holding a PEFT ``adapter_config.json``."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter_task_vector(path: str | os.PathLike[str], base: Checkpoint) -> AdapterTaskVector:
    """Read a LoRA or IA3 adapter dir as a task vector on ``base``'s tensor names (fp32).

    Raises one TaskVectorError for an unsupported adapter type or option, and one listing every
    target that has no base tensor of the right shape (an adapter made for another base).
    """
    path = Path(path)
    config = read_adapter_config(path)
    kind = adapter_kind(config, path)
    weights = adapter_weights_file(path)
    _log_base_mismatch(config, base, weights)
    with open_checkpoint(weights) as adapter:
        targets, saved = _plan(adapter, base, config, kind, weights)
        deltas: dict[str, Delta] = {}
        for t in targets:
            tensors = {part: _read(adapter, key, weights) for part, key in t.keys.items()}
            if kind == "lora":
                deltas[t.weight] = _lora_delta(t, tensors, config)
            else:
                deltas.update(_ia3_deltas(t, tensors["ia3_l"], base, config))
        head: dict[str, Tensor] = {}
        for key, (name, base_name) in saved.items():
            tensor = _read(adapter, key, weights)
            if base_name is None:
                head[name] = tensor
            elif (delta := _saved_module_delta(tensor, base, base_name, weights, key)) is not None:
                deltas[base_name] = delta
    return AdapterTaskVector(deltas=deltas, head=head, kind=kind, config=config)


def check_adapter(path: str | os.PathLike[str], base: Checkpoint) -> None:
    """Refuse, before any merge runs, what ``load_adapter_task_vector`` would refuse later: an
    unsupported adapter type or option, targets that do not fit ``base`` (an adapter made for another
    model), or a tensor holding NaN or Inf. Reads the adapter's tensors (small), not the base's."""
    path = Path(path)
    config = read_adapter_config(path)
    kind = adapter_kind(config, path)
    weights = adapter_weights_file(path)
    with open_checkpoint(weights) as adapter:
        _plan(adapter, base, config, kind, weights)
        for key in adapter.keys():
            _read(adapter, key, weights)


def read_adapter_config(path: Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter dir."""
    config_file = path / ADAPTER_CONFIG
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TaskVectorError(f"{config_file} cannot be read as JSON ({e}); copy the adapter again") from e
    if not isinstance(config, dict):
        raise TaskVectorError(f"{config_file} is not a JSON object; it is not a PEFT adapter config")
    return config


def adapter_kind(config: Mapping[str, Any], path: Path) -> Literal["lora", "ia3"]:
    """``"lora"`` or ``"ia3"``; every option that changes what the adapter computes is refused."""
    config_file = path / ADAPTER_CONFIG
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "IA3":
        return "ia3"
    if peft_type != "LORA":
        raise TaskVectorError(
            f"{config_file}: peft_type {config.get('peft_type')!r} is not supported (supermerge reads "
            f"LORA and IA3 adapters); {_MERGE_INSTEAD}"
        )
    problems = [what for field, what in _LORA_VARIANTS.items() if config.get(field)]
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (the adapter trains the base biases)")
    init = config.get("init_lora_weights", True)
    if init not in _SAFE_LORA_INITS:
        problems.append(
            f"init_lora_weights={init!r}, which changes the base weights (re-save the adapter with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA)"
        )
    if problems:
        raise TaskVectorError(
            f"{config_file}: this LoRA adapter uses {', '.join(problems)}, which supermerge cannot "
            f"read as a low-rank task vector; {_MERGE_INSTEAD}"
        )
    return "lora"


def adapter_weights_file(path: Path) -> Path:
    """The adapter's weights: safetensors, or a legacy ``.bin`` (read with ``weights_only``)."""
    for name in ADAPTER_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise TaskVectorError(
        f"{path} has {ADAPTER_CONFIG} but no adapter weights (looked for {', '.join(ADAPTER_WEIGHTS)}); "
        "copy the whole adapter dir"
    )


def _log_base_mismatch(config: Mapping[str, Any], base: Checkpoint, weights: Path) -> None:
    """Paths differ between machines, so a differing ``base_model_name_or_path`` is only noted:
    the shape check is what catches an adapter made for another model."""
    named = config.get("base_model_name_or_path")
    if not named:
        return
    base_dir = base.path if base.path.is_dir() else base.path.parent
    if Path(named).expanduser().resolve() != base_dir.resolve():
        log.info("%s was made on %r; using it with the base %s", weights, named, base.path)


def _module_key(name: str) -> str:
    """A saved key as the task model names it (``bert.encoder...query.lora_A.weight``,
    ``classifier.weight``): PEFT's wrapper prefix and any ``modules_to_save.<adapter>.`` removed."""
    name = name.removeprefix(PEFT_PREFIX)
    return _SAVED_WRAPPER.sub(".", name)


def _split_keys(
    keys: Iterable[str], kind: str
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Adapter keys grouped by module (``{module: {part: key}}``), and all other tensors by name."""
    patterns = (_LORA_KEY, _EMBEDDING_KEY) if kind == "lora" else (_IA3_KEY,)
    modules: dict[str, dict[str, str]] = {}
    others: dict[str, str] = {}
    for key in keys:
        name = _module_key(key)
        match = next((m for p in patterns if (m := p.match(name))), None)
        if match is None:
            others[key] = name
        else:
            part = match.groupdict().get("part", "ia3_l")
            modules.setdefault(match["module"], {})[part] = key
    return modules, others


def _detect_prefix(names: Iterable[str], base_names: set[str]) -> str:
    """The model-class prefix (``bert.``) such that ``prefix + base_name`` is the adapter's name.

    Each adapter name votes for every prefix that maps it onto a base tensor; the most voted wins
    (``""`` first on ties, so a headless adapter on a headless base needs no prefix).
    """
    votes: Counter[str] = Counter()
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in base_names:
                votes[".".join(parts[:i]) + ("." if i else "")] += 1
    if not votes:
        return ""
    return max(sorted(votes), key=lambda p: votes[p])


def _base_name(name: str, prefix: str, base_names: set[str]) -> str | None:
    """The base tensor an adapter-side name (``bert.pooler.dense.weight``) stands for, if any."""
    if not name.startswith(prefix):
        return None
    stripped = name[len(prefix):]
    return stripped if stripped in base_names else None


def _plan(
    adapter: Checkpoint, base: Checkpoint, config: Mapping[str, Any], kind: str, weights: Path
) -> tuple[list[_Target], dict[str, tuple[str, str | None]]]:
    """From headers alone: the targets with their base weights, and the saved-module tensors
    (file key -> (name in the task model, base name or None for a head)); one error for all problems."""
    modules, others = _split_keys(adapter.keys(), kind)
    base_names = set(base.keys())
    prefix = _detect_prefix([m + ".weight" for m in modules] + list(others.values()), base_names)
    saved_modules = list(config.get("modules_to_save") or [])
    problems: list[str] = []
    unknown = sorted(
        key for key, name in others.items()
        if not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved_modules)
    )
    if unknown:
        problems.append(
            f"tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are neither {kind.upper()} "
            f"weights nor in modules_to_save {saved_modules}; {_MERGE_INSTEAD}"
        )
    saved = {
        key: (name, _base_name(name, prefix, base_names))
        for key, name in others.items()
        if key not in unknown
    }
    targets: list[_Target] = []
    for module in sorted(modules):
        weight = _base_name(module + ".weight", prefix, base_names)
        if weight is None:
            problems.append(
                f"module {module!r} has no weight in the base (looked for "
                f"{(module.removeprefix(prefix) + '.weight')!r})"
            )
            continue
        target = _Target(module=module, weight=weight, keys=modules[module])
        check = _lora_problem if kind == "lora" else _ia3_problem
        problem = check(target, adapter, base, config)
        if problem:
            problems.append(problem)
        else:
            targets.append(target)
    for key, (_, base_name) in saved.items():
        if base_name is not None and tuple(adapter.shape(key)) != tuple(base.shape(base_name)):
            problems.append(
                f"saved module tensor {key!r} has shape {tuple(adapter.shape(key))}, the base's "
                f"{base_name!r} has {tuple(base.shape(base_name))}"
            )
    if not modules:
        problems.append(f"it holds no {kind.upper()} weights")
    if problems:
        shown = "\n  - ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise TaskVectorError(
            f"{weights} does not fit the base {base.path} ({len(problems)} problems; was the adapter "
            f"made for another model?):\n  - {shown}{more}"
        )
    return targets, saved


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of the module name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _lora_rank_alpha(module: str, config: Mapping[str, Any]) -> tuple[int, float]:
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return int(r), float(alpha)


def _lora_problem(
    t: _Target, adapter: Checkpoint, base: Checkpoint, config: Mapping[str, Any]
) -> str | None:
    """Why this LoRA target cannot become a delta of the base weight, or None."""
    parts = set(t.keys)
    embedding = parts <= {"lora_embedding_A", "lora_embedding_B"}
    a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if parts != {a_part, b_part}:
        return f"module {t.module!r} has {sorted(parts)}; a LoRA module needs both {a_part} and {b_part}"
    a, b = tuple(adapter.shape(t.keys[a_part])), tuple(adapter.shape(t.keys[b_part]))
    if len(a) != 2 or len(b) != 2:
        return (
            f"module {t.module!r} has LoRA factors of shapes {a} and {b}; only linear and embedding "
            f"layers are supported, {_MERGE_INSTEAD}"
        )
    r, _ = _lora_rank_alpha(t.module, config)
    rank_a, rank_b = (a[0], b[1])
    if rank_a != rank_b or rank_a != r:
        return (
            f"module {t.module!r} has LoRA factors of shapes {a} and {b} but the config gives rank {r}; "
            f"{ADAPTER_CONFIG} does not belong to these weights"
        )
    if embedding:
        shape = (a[1], b[0])
    else:
        shape = (a[1], b[0]) if config.get("fan_in_fan_out") else (b[0], a[1])
    base_shape = tuple(base.shape(t.weight))
    if shape != base_shape:
        return (
            f"module {t.module!r} changes a weight of shape {shape}, the base's {t.weight!r} has {base_shape}"
        )
    return None


def _lora_delta(t: _Target, tensors: Mapping[str, Tensor], config: Mapping[str, Any]) -> LowRankDelta:
    """``scaling * B @ A`` as PEFT merges it: transposed for embeddings (A is (r, vocab)) and for
    ``fan_in_fan_out`` layers (GPT-2's Conv1D stores its weight as (in, out))."""
    r, alpha = _lora_rank_alpha(t.module, config)
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    if "lora_embedding_A" in tensors:
        a, b = tensors["lora_embedding_A"], tensors["lora_embedding_B"]
        transposed = True
    else:
        a, b = tensors["lora_A"], tensors["lora_B"]
        transposed = bool(config.get("fan_in_fan_out"))
    if transposed:
        return LowRankDelta(B=a.T.contiguous(), A=b.T.contiguous(), scale=scale)
    return LowRankDelta(B=b, A=a, scale=scale)


def _is_feedforward(module: str, config: Mapping[str, Any]) -> bool:
    """PEFT's IA3 rule: a regex string must match the whole name, list entries the name's end."""
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module.endswith(k) for k in ff)


def _ia3_axis(module: str, config: Mapping[str, Any]) -> int:
    """The weight axis IA3 scales: the input for feedforward modules (axis 1 of a (out, in) weight),
    the output otherwise; swapped for ``fan_in_fan_out`` (Conv1D's (in, out)) weights."""
    axis = 1 if _is_feedforward(module, config) else 0
    return 1 - axis if config.get("fan_in_fan_out") else axis


def _ia3_problem(
    t: _Target, adapter: Checkpoint, base: Checkpoint, config: Mapping[str, Any]
) -> str | None:
    shape = tuple(adapter.shape(t.keys["ia3_l"]))
    base_shape = tuple(base.shape(t.weight))
    if len(base_shape) != 2 or len(shape) != 2:
        return (
            f"module {t.module!r}: IA3 on a weight of shape {base_shape} (vector {shape}) is not "
            f"supported, only linear layers; {_MERGE_INSTEAD}"
        )
    n = base_shape[_ia3_axis(t.module, config)]
    expected = (1, n) if _is_feedforward(t.module, config) else (n, 1)
    if shape != expected:
        return (
            f"module {t.module!r} has an IA3 vector of shape {shape}; the base's {t.weight!r} "
            f"{base_shape} needs {expected}"
        )
    return None


def _ia3_deltas(
    t: _Target, ia3_l: Tensor, base: Checkpoint, config: Mapping[str, Any]
) -> dict[str, ScaleDelta]:
    """``l - 1`` on the weight, and on the bias of a non-feedforward module (PEFT scales its output,
    bias included)."""
    vector = ia3_l.flatten() - 1.0
    axis = _ia3_axis(t.module, config)
    out = {t.weight: ScaleDelta(vector=vector, axis=axis, shape=tuple(base.shape(t.weight)))}
    bias = t.weight.removesuffix(".weight") + ".bias"
    if not _is_feedforward(t.module, config) and bias in base:
        out[bias] = ScaleDelta(vector=vector, axis=0, shape=tuple(base.shape(bias)))
    return out


def _saved_module_delta(
    tensor: Tensor, base: Checkpoint, name: str, weights: Path, key: str
) -> Tensor | None:
    """A fully trained base module (``modules_to_save`` on, say, the pooler) gives a dense delta;
    integer buffers must be the base's, as they are never merged."""
    base_tensor = base.get(name)
    if base.dtype(name).is_floating_point:
        return tensor - base_tensor.to(torch.float32)
    if not torch.equal(tensor.to(base_tensor.dtype), base_tensor):
        raise TaskVectorError(
            f"{weights}: tensor {key!r} differs from the base's integer tensor {name!r}, which is never "
            "merged; the adapter was made for another model"
        )
    return None


def _read(adapter: Checkpoint, key: str, weights: Path) -> Tensor:
    """One adapter tensor in fp32 (integer tensors as stored), refused if it holds NaN or Inf."""
    tensor = adapter.get(key)
    if not tensor.dtype.is_floating_point:
        return tensor
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise TaskVectorError(f"{weights}: tensor {key!r} holds NaN or Inf; the adapter is broken")
    return tensor


"""Checkpoint I/O: read models lazily, tensor by tensor; write merged models atomically.

Reading never unpickles: safetensors files are memory-mapped headers plus tensors read on demand, and
the legacy ``pytorch_model.bin`` is loaded with ``torch.load(weights_only=True, mmap=True)``, which
refuses arbitrary Python objects. Writing produces a directory ``transformers`` loads directly
(``config.json`` and tokenizer files from the base, sharded safetensors + index) and appears only when
complete: it is written to a temporary sibling and renamed into place. Its ``supermerge.json`` records
the sha256 of every other file in the dir (``checksums``), so a reader can tell a whole model from one
cut or changed after it was written (``verify_checksums``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from supermerge.merge_core.errors import CheckpointError

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
RECORD_FILE = "supermerge.json"
CHECKSUMS_FIELD = "checksums"
"""The field of ``supermerge.json`` mapping each other file of the model dir (its path relative to the
dir, with ``/``) to the sha256 of its bytes, written once the files are complete."""
DEFAULT_SHARD_BYTES = 2 * 1024**3
"""Shard size of written models (bytes); transformers' own default is 5 GB, smaller shards make a
partial rewrite cheaper and keep peak I/O buffers small."""

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "added_tokens.json",
)
"""Files copied from the base so the merged dir loads (and tokenizes) like the base."""

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class Checkpoint:
    """A read-only view of a model's tensors; each ``get`` reads one tensor from disk (or mmap).

    Use as a context manager (or call ``close``) to release the file handles.
    """

    def __init__(self, path: Path, files: Mapping[str, Path], bin_state: dict[str, Tensor] | None = None,
                 handles: Mapping[Path, Any] | None = None):
        self.path = path
        self._file_of = dict(files)
        self._bin = bin_state
        self._handles: dict[Path, Any] = dict(handles or {})
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if bin_state is None:
            for f in sorted(set(self._file_of.values())):
                handle = self._open(f)
                for name in handle.keys():
                    if self._file_of.get(name) == f:
                        sl = handle.get_slice(name)
                        self._meta[name] = (tuple(sl.get_shape()), _dtype(sl.get_dtype(), f, name))
            missing = sorted(set(self._file_of) - set(self._meta))
            if missing:
                raise CheckpointError(
                    f"{path}: the index names {len(missing)} tensor(s) its shards do not hold, e.g. "
                    f"{missing[:3]}; the download or copy is incomplete"
                )
        else:
            self._meta = {n: (tuple(t.shape), t.dtype) for n, t in bin_state.items()}

    def _open(self, f: Path):
        if f not in self._handles:
            if not f.is_file():
                raise CheckpointError(f"{f} does not exist (named by {self.path})")
            try:
                self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(
                    f"{f} is not a readable safetensors file ({e}); it may be truncated or corrupted: copy it again"
                ) from e
        return self._handles[f]

    def keys(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: object) -> bool:
        return name in self._meta

    def __len__(self) -> int:
        return len(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._known(name)][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[self._known(name)][1]

    def numel(self) -> int:
        """Total number of values over all tensors."""
        total = 0
        for shape, _ in self._meta.values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def file_of(self, name: str) -> Path:
        return self._file_of.get(self._known(name), self.path)

    def get(self, name: str) -> Tensor:
        """The stored tensor (CPU, stored dtype). Each call reads it again: callers own the copy."""
        self._known(name)
        if self._bin is not None:
            return self._bin[name]
        f = self._file_of[name]
        try:
            return self._open(f).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read tensor {name!r} ({e}); the file may be truncated") from e

    def _known(self, name: str) -> str:
        if name not in self._meta:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        return name

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dtype(code: str, f: Path, name: str) -> torch.dtype:
    try:
        return _SAFETENSORS_DTYPES[code]
    except KeyError:
        raise CheckpointError(f"{f}: tensor {name!r} has dtype {code}, which supermerge cannot read") from None


def _index_files(index_path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a valid shard index (needs a 'weight_map'): {e}") from e
    return {name: index_path.parent / shard for name, shard in weight_map.items()}


def _single_file(path: Path, f: Path) -> Checkpoint:
    """The checkpoint at ``path`` held in one file ``f``, its header read through one handle (kept
    open until ``close``)."""
    try:
        handle = safe_open(str(f), framework="pt", device="cpu")
        names = handle.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{f} is not a readable safetensors file ({e}); it may be truncated or corrupted: copy it again"
        ) from e
    return Checkpoint(path, {name: f for name in names}, handles={f: handle})


def _load_bin(f: Path) -> dict[str, Tensor]:
    """Legacy PyTorch weights, loaded without executing pickled code."""
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or others for bad files
        raise CheckpointError(
            f"{f} cannot be loaded safely ({type(e).__name__}: {_load_failure(e)}); "
            "supermerge never unpickles arbitrary objects: convert the model to safetensors "
            "(model.save_pretrained(dir, safe_serialization=True)) and point to that"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{f} does not hold a flat dict of tensors (a state_dict)")
    return state


def _load_failure(e: Exception) -> str:
    """The line of torch.load's error that says what was refused: for a pickle holding other objects
    than tensors, the global it would have imported ('Unsupported global: ...'), else the first line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    refused = [line.split("WeightsUnpickler error: ", 1)[-1].split(". Please use")[0]
               for line in lines if "Unsupported global" in line]
    return refused[0] if refused else next((line for line in lines if line), "no message")


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a ``.safetensors`` file, a sharded safetensors dir, a Hugging Face model dir, or a
    ``.bin`` state dict (weights only). Nothing but headers is read until ``get``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a .safetensors file or a model directory")
    if path.is_file():
        if path.suffix == ".safetensors":
            return _single_file(path, path)
        if path.suffix in (".bin", ".pt", ".pth"):
            return Checkpoint(path, {}, _load_bin(path))
        if path.name.endswith(".index.json"):
            return Checkpoint(path, _index_files(path))
        raise CheckpointError(f"{path}: unknown checkpoint format; expected .safetensors, .bin or a model dir")
    if (path / SAFETENSORS_INDEX).is_file():
        return Checkpoint(path, _index_files(path / SAFETENSORS_INDEX))
    if (path / SAFETENSORS_SINGLE).is_file():
        return _single_file(path, path / SAFETENSORS_SINGLE)
    if (path / BIN_SINGLE).is_file():
        log.warning("%s: reading legacy pytorch_model.bin with weights_only=True", path)
        return Checkpoint(path, {}, _load_bin(path / BIN_SINGLE))
    if (path / BIN_INDEX).is_file():
        raise CheckpointError(
            f"{path}: sharded .bin checkpoints are not supported; re-save the model with "
            "save_pretrained(dir, safe_serialization=True)"
        )
    if (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path} is a PEFT adapter, not a full model; give it as a fine-tuned model")
    found = sorted(p.name for p in path.iterdir())[:10]
    raise CheckpointError(
        f"{path} holds no model weights (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
        f"{BIN_SINGLE}); it contains {found}"
    )


def config_dir(path: str | os.PathLike[str]) -> Path | None:
    """The Hugging Face model dir (with ``config.json``) a checkpoint path belongs to, if any."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return folder if (folder / "config.json").is_file() else None


def _unshare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors sharing storage (tied weights): give each its own contiguous copy."""
    seen: set[int] = set()
    out = {}
    for n, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[n] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _write_shards(
    folder: Path, tensors: Iterable[tuple[str, Tensor]], max_shard_bytes: int, progress: bool
) -> None:
    """Write tensors as shards of at most ``max_shard_bytes`` (one bigger tensor gets its own)."""
    shards: list[list[str]] = []
    pending: dict[str, Tensor] = {}
    pending_bytes = 0
    total = 0
    weight_map: dict[str, str] = {}

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            tmp_name = f"shard-{len(shards):05d}.tmp"
            try:
                save_file(_unshare(pending), str(folder / tmp_name), metadata={"format": "pt"})
            except SafetensorError as e:
                raise os_error(e, folder / tmp_name) from None
            shards.append(list(pending))
            for n in pending:
                weight_map[n] = tmp_name
            pending, pending_bytes = {}, 0

    for name, tensor in tqdm(tensors, desc="writing tensors", disable=not progress, leave=False, unit="tensor"):
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += size
        total += size
    flush()
    if not shards:
        raise CheckpointError("refusing to write a model with no tensors")
    if len(shards) == 1:
        (folder / "shard-00000.tmp").rename(folder / SAFETENSORS_SINGLE)
        return
    names = {}
    for i in range(len(shards)):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"shard-{i:05d}.tmp").rename(folder / final)
        names[f"shard-{i:05d}.tmp"] = final
    index = {"metadata": {"total_size": total}, "weight_map": {n: names[s] for n, s in weight_map.items()}}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def _model_card(record: Mapping[str, Any]) -> str:
    tasks = record.get("tasks", [])
    lines = [
        "# Merged model (supermerge)",
        "",
        f"- method: `{record.get('method', '?')}` ({record.get('paper', '')})",
        f"- base: `{record.get('base', '?')}`",
        f"- tasks: {', '.join(f'`{t}`' for t in tasks) or '-'}",
        "",
        "Load the merged weights with `transformers` (`AutoModel.from_pretrained(this_dir)`). Each task keeps",
        "its own classification head, unmerged, in `heads/<task>.safetensors`; supermerge's evaluation puts",
        "it in place. How the model was made, with every parameter, is in `supermerge.json`.",
        "",
    ]
    return "\n".join(lines)


def write_model_dir(
    out_dir: str | os.PathLike[str],
    tensors: Iterable[tuple[str, Tensor]],
    *,
    config_from: str | os.PathLike[str] | None,
    record: Mapping[str, Any],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
    progress: bool = False,
) -> Path:
    """Write a model dir atomically: it either appears complete at ``out_dir`` or not at all.

    ``tensors`` is consumed once, lazily (a generator keeps peak memory at one shard). ``record`` is
    saved as ``supermerge.json`` (and summarised in README.md); ``extra_files`` maps relative paths to
    bytes (per-task heads, merge weights). An existing ``out_dir`` is replaced only with ``overwrite``.
    """
    with atomic_model_dir(out_dir, overwrite=overwrite) as tmp:
        _write_shards(tmp, tensors, max_shard_bytes, progress)
        finish_model_dir(tmp, config_from=config_from, record=record, extra_files=extra_files)
    return Path(out_dir)


@contextlib.contextmanager
def atomic_model_dir(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``out_dir`` to fill; renamed to ``out_dir`` when the block ends without
    an error, removed when it raises. An existing ``out_dir`` is refused (before the block runs)
    unless ``overwrite``, and then replaced only once the new one is complete."""
    out = Path(out_dir)
    refuse_existing(out, overwrite=overwrite, option="overwrite (--overwrite)")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory; remove it or choose another output")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out)


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete dir ``tmp`` to ``out`` (its sibling), replacing an ``out`` that was there
    when the write began. An ``out`` that another process put in place meanwhile is not clobbered by
    accident: the rename fails, and that is said plainly."""
    try:
        if out.exists():
            trash = out.parent / f".{out.name}.replaced"
            if trash.exists():
                shutil.rmtree(trash)
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise CheckpointError(
            f"{out} was created by another process while this one was writing it; nothing of this run "
            "was put there: choose another output, or pass --overwrite to replace it"
        ) from None


def finish_model_dir(
    folder: Path,
    *,
    config_from: str | os.PathLike[str] | None,
    record: Mapping[str, Any],
    extra_files: Mapping[str, bytes] | None = None,
) -> None:
    """Everything of a model dir but its weights: the base's config and tokenizer files,
    ``extra_files`` (relative path -> bytes), ``supermerge.json`` and the README model card."""
    if config_from is not None:
        for name in MODEL_FILES:
            src = Path(config_from) / name
            if src.is_file():
                shutil.copy2(src, folder / name)
    for rel, data in (extra_files or {}).items():
        target = _inside(folder, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (folder / "README.md").write_text(_model_card(record))
    record = {**record, CHECKSUMS_FIELD: model_dir_checksums(folder)}
    (folder / RECORD_FILE).write_text(json.dumps(dict(record), indent=2, sort_keys=True, default=str))


def _inside(folder: Path, rel: str) -> Path:
    """``folder / rel``, refused when ``rel`` would leave ``folder`` (an absolute path, ``..``): file
    names come from task names and stored heads, and a model dir writes nowhere but inside itself."""
    target = (folder / rel).resolve()
    if Path(rel).is_absolute() or not target.is_relative_to(folder.resolve()):
        raise CheckpointError(
            f"refusing to write {rel!r}: it is outside the model dir {folder}; a file name in a model dir "
            "must be a relative path without '..'"
        )
    return folder / rel


# --- checksums -------------------------------------------------------------------------------------

_DIGESTS: dict[tuple[int, int, int, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


def file_sha256(f: Path) -> str:
    """sha256 of a file's bytes (hex). Remembered per (device, inode, size, mtime, ctime), so a file
    checked once in this process is not read again while it is unchanged: a resumed run checks each
    stored node before reusing it and again before reading it back as an input (about 1 GB/s each)."""
    st = f.stat()
    signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(signature)
    if known is not None:
        return known
    with f.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    with _DIGESTS_LOCK:
        _DIGESTS[signature] = digest
    return digest


def model_dir_checksums(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` but ``supermerge.json`` (which holds them)."""
    return {
        f.relative_to(folder).as_posix(): file_sha256(f)
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.relative_to(folder).as_posix() != RECORD_FILE
    }


def verify_checksums(folder: Path, record: Mapping[str, Any]) -> str | None:
    """Why ``folder``'s files are not the ones its record's checksums describe, or None when every
    recorded file is there with the bytes it was written with. Files the record does not list (a
    published model's ``merge_report.json``) are not checked."""
    sums = record.get(CHECKSUMS_FIELD)
    if not isinstance(sums, dict) or not sums:
        return f"{folder / RECORD_FILE} records no checksums, so its files cannot be verified"
    for rel, expected in sorted(sums.items()):
        f = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"{folder / RECORD_FILE} lists {rel!r}, which is not a file inside the model dir"
        if not f.is_file():
            return f"{f} is missing"
        if file_sha256(f) != expected:
            return f"{f} does not have the sha256 recorded when it was written (it was changed or cut since)"
    return None


# --- streaming writer: shard layout planned from shapes, each tensor written as it arrives ---------

_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorMeta:
    """What the writer must know of a tensor before its values exist: name, shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(metas: Sequence[TensorMeta], max_shard_bytes: int) -> list[list[TensorMeta]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_bytes`` (a bigger tensor gets
    its own): the rule ``write_model_dir`` applies, decided from shapes alone."""
    shards: list[list[TensorMeta]] = []
    size = 0
    for meta in metas:
        if shards and shards[-1] and size + meta.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        if not shards:
            shards.append([])
        shards[-1].append(meta)
        size += meta.nbytes
    return shards


def _safetensors_header(shard: Sequence[TensorMeta]) -> bytes:
    """The file header of a shard holding ``shard``'s tensors in order (8-byte length, JSON padded
    with spaces to a multiple of 8, as the safetensors library writes it)."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for meta in shard:
        code = _SAFETENSORS_CODES.get(meta.dtype)
        if code is None:
            raise CheckpointError(f"tensor {meta.name!r} has dtype {meta.dtype}, which safetensors cannot store")
        entries[meta.name] = {"dtype": code, "shape": list(meta.shape), "data_offsets": [offset, offset + meta.nbytes]}
        offset += meta.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _raw_bytes(tensor: Tensor) -> memoryview:
    """The tensor's values as little-endian bytes, without a copy when it is contiguous on the CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_shards_streaming(
    folder: Path,
    metas: Sequence[TensorMeta],
    tensors: Iterable[tuple[str, Tensor]],
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
) -> list[Path]:
    """Write ``tensors`` (in the order of ``metas``, each matching its name, shape and dtype) as
    safetensors shards of at most ``max_shard_bytes``, plus the index when there is more than one.

    Each tensor goes to disk as it arrives and is not kept, so the writer holds no more than the
    tensor it is given, where ``write_model_dir`` holds a shard. Returns the shard paths.
    """
    if not metas:
        raise CheckpointError("refusing to write a model with no tensors")
    shards = plan_shards(metas, max_shard_bytes)
    if len(shards) == 1:
        files = [SAFETENSORS_SINGLE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    incoming = iter(tensors)
    bar = tqdm(total=len(metas), desc="writing tensors", disable=not progress, leave=False, unit="tensor")
    with bar:
        for shard, file in zip(shards, files, strict=True):
            with _naming(folder / file), open(folder / file, "wb") as f:
                f.write(_safetensors_header(shard))
                for meta in shard:
                    name, tensor = next(incoming, (None, None))
                    if tensor is None:
                        raise CheckpointError(f"the tensors ran out before {meta.name!r} (of {len(metas)} planned)")
                    if name != meta.name or tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
                        raise CheckpointError(
                            f"expected tensor {meta.name!r} {meta.shape} {meta.dtype} next, got {name!r} "
                            f"{tuple(tensor.shape)} {tensor.dtype}; the tensors must come in the planned order"
                        )
                    f.write(_raw_bytes(tensor))
                    del tensor
                    bar.update(1)
    if next(incoming, None) is not None:
        raise CheckpointError(f"more tensors came than the {len(metas)} planned")
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(m.nbytes for m in metas)},
            "weight_map": {m.name: file for shard, file in zip(shards, files, strict=True) for m in shard},
        }
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return [folder / f for f in files]


def os_error(e: Exception, path: Path) -> OSError:
    """An OSError naming ``path`` for a write that failed there (safetensors words a full disk as
    ``SafetensorError: ... (os error 28)``; a failed ``write()`` names no file)."""
    if isinstance(e, OSError) and e.errno is not None:
        return OSError(e.errno, e.strerror or str(e), str(path))
    found = re.search(r"os error (\d+)", str(e))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code), str(path))


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise an OSError that names no file as one naming ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise os_error(e, path) from None


def existing_output(out: Path, *, overwrite: bool, option: str = "--overwrite",
                    instead: str = "another output") -> str | None:
    """The one wording of "that output is already there", or None when ``out`` is absent or ``overwrite``.

    ``option`` is how this caller's user overwrites (a flag, a flow parameter), ``instead`` what to choose
    in its place."""
    if overwrite or not out.exists():
        return None
    return f"{out} already exists; choose {instead} or pass {option}"


def refuse_existing(out: Path, *, overwrite: bool, option: str = "--overwrite", instead: str = "another output") -> None:
    """Raise ``existing_output``'s refusal as a CheckpointError, before any work is done."""
    problem = existing_output(out, overwrite=overwrite, option=option, instead=instead)
    if problem is not None:
        raise CheckpointError(problem)


def output_problem(out: Path, *, overwrite: bool) -> str | None:
    """Why a model dir cannot be written at ``out``, seen before any work: it exists (without
    ``overwrite``) or is not a directory, a folder above it is a file or a symlink loop, or the
    filesystem there is read-only or not writable. None when it can be tried (a write may still fail:
    a full disk, a permission root bypasses)."""
    try:
        st = os.stat(out)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:
        return f"cannot write {out}: {e.strerror} ({'a symbolic link on its path leads back to itself' if e.errno == errno.ELOOP else 'check the path'})"
    if st is not None:
        if not out.is_dir():
            return (f"{out} exists and is not a directory; supermerge replaces only a model dir it wrote: remove it "
                    "or choose another output")
        if not overwrite:
            return existing_output(out, overwrite=overwrite)
    folder = out.parent
    while True:
        try:
            os.stat(folder)
            break
        except (FileNotFoundError, NotADirectoryError):
            folder = folder.parent
        except OSError as e:
            return f"cannot write {out}: {folder}: {e.strerror}"
    if not folder.is_dir():
        return f"cannot write {out}: {folder} is a file, not a folder; choose another output"
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return f"cannot write {out}: {folder} is on a read-only filesystem; choose another output"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write {out}: {folder} is not writable by this user; choose another output"
    return None


def read_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``supermerge.json`` record of a model supermerge wrote, or None for other models."""
    f = Path(path) / RECORD_FILE
    return json.loads(f.read_text()) if f.is_file() else None

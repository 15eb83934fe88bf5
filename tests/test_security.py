"""Security properties, checked over the source tree and the configs: nothing unpickles code, no model's
own code is run, config paths write only to the output and its store, the documented server is local."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from supermerge.merge_core.config import parse_config
from supermerge.merge_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("merge_core", "orchestrator", "flows", "bench", "deploy")
           for p in sorted((REPO / folder).rglob("*.py"))]


def _calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text(), filename=str(path))) if isinstance(n, ast.Call)]


def _name(func: ast.expr) -> str:
    """``torch.load`` for ``torch.load(...)``, ``load`` for ``load(...)``."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is(value: ast.expr | None, constant: object) -> bool:
    return isinstance(value, ast.Constant) and value.value is constant


UNSAFE_CALLS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads", "cloudpickle.load",
                "cloudpickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "eval", "exec",
                "marshal.loads", "shelve.open"}


def test_the_tree_is_scanned():
    names = {p.relative_to(REPO).as_posix() for p in SOURCES}
    assert {"merge_core/checkpoint.py", "orchestrator/node.py", "flows/cli.py"} <= names


def test_every_torch_load_is_weights_only_and_nothing_else_unpickles():
    problems = []
    for path in SOURCES:
        for call in _calls(path):
            name = _name(call.func)
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            if name == "torch.load" and not _is(_keyword(call, "weights_only"), True):
                problems.append(f"{where}: torch.load without weights_only=True")
            if "weights_only" in {k.arg for k in call.keywords} and not _is(_keyword(call, "weights_only"), True):
                problems.append(f"{where}: {name}(weights_only=...) not True")
            if name in UNSAFE_CALLS:
                problems.append(f"{where}: {name}")
    assert problems == []


def test_trust_remote_code_is_never_set():
    problems = [f"{path.relative_to(REPO)}:{call.lineno}" for path in SOURCES for call in _calls(path)
                for k in call.keywords if k.arg == "trust_remote_code" and not _is(k.value, False)]
    problems += [f"{path.relative_to(REPO)}: **kwargs may carry trust_remote_code" for path in SOURCES
                 if re.search(r"trust_remote_code\s*=\s*True|[\"']trust_remote_code[\"']\s*:\s*True", path.read_text())]
    assert problems == []


def test_the_documented_server_command_binds_to_localhost():
    documented = [REPO / "deploy" / "README.md", REPO / "deploy" / "e2e.sh", REPO / "README.md",
                  *sorted((REPO / "docs").glob("*.md"))]
    commands = [(f.name, line) for f in documented if f.is_file() for line in f.read_text().splitlines()
                if "prefect server start" in line]
    assert any(name == "README.md" for name, _ in commands), "deploy/README.md documents the server command"
    assert [c for c in commands if "--host 127.0.0.1" not in c[1]] == []


# --- config paths: the output and its store are the only places written -------------------------


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    """A base model dir (config.json + weights file) and two fine-tuned model dirs, as files on disk:
    validating a config reads no weights."""
    out = {}
    for name in ("base", "models/alpha", "models/beta"):
        folder = tmp_path / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")
        out[name.split("/")[-1]] = folder
    return out


def _config(inputs: dict[str, Path], output: Path, base: Path | None = None, names: tuple[str, str] = ("alpha", "beta"),
            ) -> dict[str, object]:
    return {"base": str(base or inputs["base"]), "output": str(output), "method": "average",
            "models": [{"name": n, "path": str(inputs[m])} for n, m in zip(names, ("alpha", "beta"), strict=True)]}


@pytest.mark.parametrize("where", ["inside the base", "inside a fine-tuned model", "the base itself",
                                   "above the fine-tuned models", "the folder of the base's weights file"])
def test_an_output_overlapping_an_input_is_refused(inputs, where):
    output = {
        "inside the base": inputs["base"] / "merged",
        "inside a fine-tuned model": inputs["alpha"] / "sub" / "merged",
        "the base itself": inputs["base"],
        "above the fine-tuned models": inputs["alpha"].parent,
        "the folder of the base's weights file": inputs["base"] / "merged",
    }[where]
    base = inputs["base"] / "model.safetensors" if where == "the folder of the base's weights file" else None
    with pytest.raises(ConfigError, match="overlaps the input"):
        parse_config(_config(inputs, output, base))


def test_an_output_beside_the_inputs_is_accepted(inputs, tmp_path):
    assert parse_config(_config(inputs, tmp_path / "merged")).output == tmp_path / "merged"


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "/abs", "a\\b", "", "..", "x y"])
def test_task_names_that_could_leave_a_folder_are_refused(inputs, tmp_path, name):
    """Task names become file names (``heads/<task>.safetensors``): only letters, digits, '_', '.', '-',
    not starting with '.'."""
    with pytest.raises(ConfigError, match=r"models\.0\.name"):
        parse_config(_config(inputs, tmp_path / "merged", names=(name, "beta")))

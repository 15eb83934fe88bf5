"""`supermerge export`: one task of a merged model loads with plain transformers and gives the logits
`supermerge evaluate` scored; `--all` stores the body once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

from supermerge.flows.cli import main
from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.model import FunctionalModel
from supermerge.merge_core.stream import stream_merge
from tests.tiny import make_task_data

LOAD = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging
logging.set_verbosity_warning()
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
torch.save(logits, sys.argv[3])
print(json.dumps(model.config.id2label))
assert "merge_core" not in sys.modules and "supermerge" not in sys.modules
"""


def _labelled_copy(src, dst, names):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_exported_task_loads_in_plain_transformers_with_the_evaluated_logits(tiny_base_dir, tiny_finetuned, tmp_path):
    alpha = _labelled_copy(tiny_finetuned["alpha"], tmp_path / "alpha", ["absent", "present"])
    merged = stream_merge(tiny_base_dir, [("alpha", alpha), ("beta", tiny_finetuned["beta"])], "task_arithmetic",
                          {"lambda": 0.6}, tmp_path / "merged")
    record = json.loads((merged / "supermerge.json").read_text())
    assert record["labels"] == {"alpha": {"0": "absent", "1": "present"}}  # beta's are transformers' LABEL_i

    assert main(["export", str(merged), "--task", "alpha", "--out", str(tmp_path / "alpha-clf")]) == 0
    ids = make_task_data("alpha", 16, seed=3).inputs["input_ids"]
    torch.save(ids, tmp_path / "ids.pt")
    # a process that imports only torch, transformers and safetensors (no PYTHONPATH, another cwd)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "alpha-clf"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, env=env, cwd=tmp_path,
                          check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"0": "absent", "1": "present"}
    assert "MISSING" not in done.stderr and "newly initialized" not in done.stderr, done.stderr

    # what evaluate scores: the functional model with the merged tensors and the task's own head
    fm = FunctionalModel(tiny_base_dir)
    with open_checkpoint(merged) as ck:
        params = {n: ck.get(n).float() for n in ck.keys() if ck.dtype(n).is_floating_point}
    head = load_file(merged / "heads" / "alpha.safetensors")
    with torch.no_grad():
        scored = fm.logits(params, head, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), scored, rtol=0, atol=1e-6)


def test_export_all_stores_the_body_once(tiny_base_dir, tiny_finetuned, tmp_path):
    models = [(t, tiny_finetuned[t]) for t in ("alpha", "beta", "gamma")]
    merged = stream_merge(tiny_base_dir, models, "ties", {"density": 0.5}, tmp_path / "merged")
    assert main(["export", str(merged), "--all", "--out", str(tmp_path / "clf")]) == 0
    bodies = [tmp_path / "clf" / t / "body.safetensors" for t, _ in models]
    inodes = {b.stat().st_ino for b in bodies}
    assert len(inodes) == 1 and bodies[0].stat().st_nlink == 3  # one file on disk, three names
    heads = [load_file(tmp_path / "clf" / t / "head.safetensors")["classifier.weight"] for t, _ in models]
    assert not torch.equal(heads[0], heads[1])
    # the body holds the merged tensors under the classifier's names (a headless BERT gains "bert.")
    body = load_file(bodies[0])
    with open_checkpoint(merged) as ck:
        for n in ck.keys():
            assert torch.equal(body[f"bert.{n}"], ck.get(n)), n


def test_export_refuses_an_unknown_task_and_an_existing_dir(tiny_base_dir, tiny_finetuned, tmp_path):
    models = [(t, tiny_finetuned[t]) for t in ("alpha", "beta")]
    merged = stream_merge(tiny_base_dir, models, "task_arithmetic", None, tmp_path / "merged")
    assert main(["export", str(merged), "--task", "nope", "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "y").mkdir()
    assert main(["export", str(merged), "--task", "alpha", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists()


def test_loading_the_merged_folder_reports_no_missing_weights(tiny_base_dir, tiny_finetuned, tmp_path):
    models = [(t, tiny_finetuned[t]) for t in ("alpha", "beta")]
    merged = stream_merge(tiny_base_dir, models, "task_arithmetic", None, tmp_path / "merged")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoModel; "
                           "from transformers.utils import logging; logging.set_verbosity_warning(); "
                           "AutoModel.from_pretrained(sys.argv[1])", str(merged)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert "MISSING" not in done.stderr and "newly initialized" not in done.stderr, done.stderr




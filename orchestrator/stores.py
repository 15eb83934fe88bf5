"""Which store a location names: a local (or shared-mount) folder, or an S3 bucket.

Its own module because it knows both backends: ``supermerge.orchestrator.object_store`` builds on
``supermerge.orchestrator.store``, so the choice between them sits above both (no import circle).
"""

from __future__ import annotations

import os
from pathlib import Path

from supermerge.merge_core.config import MergeConfig
from supermerge.orchestrator.errors import StoreError
from supermerge.orchestrator.object_store import ObjectStore, default_cache_dir, s3_filesystem
from supermerge.orchestrator.store import CheckpointStore, Store

STORE_DIR = ".supermerge-store"
"""The default store's folder name, beside the output."""


def open_store(location: str | os.PathLike[str], *, cache_dir: Path | None = None) -> Store:
    """The store at ``location``: a local (or shared-mount) folder, or ``s3://bucket/prefix``.

    ``cache_dir``: where an S3 store's entries are downloaded to and written before upload (default
    ``~/.cache/supermerge/stores/<hash of the URL>``). ``AWS_ENDPOINT_URL`` points s3fs at an
    S3-compatible server (MinIO, moto)."""
    text = str(location)
    if "://" not in text:
        return CheckpointStore(Path(text))
    scheme, _, rest = text.partition("://")
    if scheme != "s3" or not rest.strip("/"):
        raise StoreError(f"store {text!r}: give a local folder or an s3://bucket/prefix URL (other fsspec "
                         "protocols have no conditional put to lock with)")
    url = "s3://" + rest.rstrip("/")
    cache = CheckpointStore(cache_dir if cache_dir is not None else default_cache_dir(url))
    return ObjectStore(url, cache, s3_filesystem(os.environ.get("AWS_ENDPOINT_URL")))


def default_store_dir(output: Path) -> Path:
    """The store beside the output, shared by every output in that folder (keys are by content)."""
    return output.parent / STORE_DIR


def store_location(config: MergeConfig) -> str | Path:
    """Where a run's store is: the config's ``store`` (a folder or ``s3://`` URL; ``--store`` sets it),
    else the folder beside the output. One answer for merge, plan and prune."""
    return config.store if config.store is not None else default_store_dir(config.output)


def config_store(config: MergeConfig) -> Store:
    """The store a run uses (``store_location``), opened."""
    return open_store(store_location(config))

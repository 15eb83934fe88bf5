"""The store's size (shared vs its own bytes) and pruning what no published output names."""

from __future__ import annotations

import json
import os

from supermerge.orchestrator.store_usage import prune, store_usage, used_keys


def test_usage_counts_hard_linked_bytes_as_shared_and_prune_keeps_what_outputs_name(tmp_path):
    store = tmp_path / ".supermerge-store"
    for key, size in (("aa", 1000), ("bb", 300), ("cc", 50)):
        (store / key).mkdir(parents=True)
        (store / key / "model.safetensors").write_bytes(b"x" * size)
    (store / ".locks").mkdir()
    published = tmp_path / "merged"
    published.mkdir()
    os.link(store / "aa" / "model.safetensors", published / "model.safetensors")  # the root, published
    (published / "merge_report.json").write_text(json.dumps({"nodes": [{"key": "aa"}, {"key": "bb"}]}))

    usage = store_usage(store)
    assert (usage.entries, usage.bytes, usage.own_bytes) == (3, 1350, 350)
    assert "3 node(s)" in usage.render() and "store prune" in usage.render()

    assert used_keys(tmp_path, "merge_report.json") == {"aa", "bb"}
    assert prune(store, {"aa", "bb"}) == (1, 50)
    assert sorted(p.name for p in store.iterdir()) == [".locks", "aa", "bb"]
    assert prune(store, set()) == (2, 300)  # --all: the output keeps the root's bytes through its link
    assert (published / "model.safetensors").read_bytes() == b"x" * 1000
    assert store_usage(store).render().endswith("empty")

"""Merge operators, one module per paper; supermerge.merge_core.methods.registry is the one list of them."""

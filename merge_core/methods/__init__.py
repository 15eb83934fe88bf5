"""Merge operators, one module per paper; merge_core.methods.registry is the one list of them."""

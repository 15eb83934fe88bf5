"""Planning merges: task-vector similarity, the merge tree, the memory planner, the checkpoint store.

No Prefect here; flows/ wraps these functions.
"""

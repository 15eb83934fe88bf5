"""supermerge's math and I/O: checkpoints, task vectors, merge methods, merged forward, evaluation.

No Prefect and no orchestration here: functions take tensors (or paths) and return tensors.
"""

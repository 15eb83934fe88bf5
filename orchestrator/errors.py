"""Every error the orchestrator raises on purpose.

They subclass merge_core's ``SupermergeError``, so the CLI prints each as one line and exits non-zero.
Like merge_core's, each names the model, node or file at fault and says what to do, and each is raised
while planning, before anything is written, wherever the problem can be seen up front.
"""

from supermerge.merge_core.errors import SupermergeError


class OrchestratorError(SupermergeError):
    """Base class of the orchestrator's errors."""


class TreeError(OrchestratorError):
    """A merge tree cannot be built: bad hand-given groups, a fan-in below 2, clashing names."""


class MemoryBudgetError(OrchestratorError):
    """No plan fits the memory budget: even the smallest fan-in needs more than there is."""


class StoreError(OrchestratorError):
    """The checkpoint store holds something inconsistent, or a node's inputs changed since planning."""


class NodeOutOfMemoryError(OrchestratorError):
    """A merge node ran out of memory while it ran (more than predicted was needed, or other work took
    the memory): that node fails; nodes finished before it stay in the store for the next run."""


class PlacementError(OrchestratorError):
    """A merge node fits no configured work pool (its device class, or its predicted peak): refused
    before any node runs."""


class RemoteNodeError(OrchestratorError):
    """A merge node's run on a worker ended without completing (failed, crashed, cancelled): that
    node's task fails, and its retries start another run."""

"""Every error merge_core raises on purpose.

Each message names the file, tensor or key at fault and says what to do. They are raised before any
work starts wherever the problem can be seen up front, so a refused merge writes nothing.
"""


class SupermergeError(Exception):
    """Base class: the CLI prints these as one clear line and exits non-zero."""


class CheckpointError(SupermergeError):
    """A checkpoint is missing, unreadable, truncated, pickled, or cannot be written."""


class TaskVectorError(SupermergeError):
    """A fine-tuned model or adapter does not fit the base (names, shapes, dtypes, non-finite values)."""


class ConfigError(SupermergeError):
    """A merge config or method parameter is invalid (unknown method, k=1, bad YAML, ...)."""


class DataError(SupermergeError):
    """Validation or test data is missing, empty, or unlabelled where labels are needed."""


class NonFiniteError(SupermergeError):
    """A merged result holds NaN or Inf (an overflow, or a scale too large): it is neither stored nor
    published."""

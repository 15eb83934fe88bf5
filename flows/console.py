"""What a command prints when it stops on an error: one line that names the path and what to do."""

from __future__ import annotations

import errno


def os_error_line(e: OSError) -> str:
    """An OSError as one line naming the path and what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    advice = {
        errno.ENOSPC: "free space there, or choose an output on another filesystem",
        errno.EFBIG: "the file is larger than this filesystem or a limit on this process allows",
        errno.EROFS: "the filesystem is read-only: choose another output",
        errno.EACCES: "permission denied: choose a path this user may write, or fix its permissions",
        errno.EPERM: "not permitted: choose a path this user may write",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.ELOOP: "a symbolic link on the path leads back to itself",
        errno.EEXIST: "something is already there",
    }.get(e.errno or 0, "check the path and the filesystem")
    return f"{where or 'a file'}: {e.strerror or e} ({advice})"

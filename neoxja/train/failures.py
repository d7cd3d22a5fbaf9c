"""Failures of the environment (a full disk, a read-only or foreign directory) as one clear line.

Training and preparing write a lot; when the machine refuses, the user needs to know what and where,
not a traceback. torch.save reports a failed write as `RuntimeError: [enforce fail at
inline_container.cc:...] unexpected pos ...` (or `file write failed`), without the path or the cause:
`save_with_path` re-raises it as an OSError naming the file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

_TORCH_WRITE_FAILURE = ("inline_container", "file write failed", "unexpected pos")
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded")


def is_torch_write_failure(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _TORCH_WRITE_FAILURE)


def as_write_error(err: BaseException, path: str | os.PathLike) -> OSError:
    """torch's write failure as an OSError naming `path` (the disk is the usual cause)."""
    return OSError(errno.ENOSPC, "no space left on device (torch could not write the file: "
                   f"{str(err).splitlines()[0][:120]})", str(path))


def describe(err: BaseException, where: str | os.PathLike) -> str | None:
    """One line for an environment failure while writing under `where`; None for anything else."""
    if is_torch_write_failure(err):
        err = as_write_error(err, where)
    if not isinstance(err, OSError):
        if any(text in str(err) for text in _DISK_FULL_TEXT):  # e.g. safetensors' own I/O error
            return f"cannot write under {where}: the disk is full (no space left on device)"
        return None
    path = err.filename or where
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {path}: the disk is full ({err.strerror}); free some space, then run again"
    if err.errno == errno.EROFS:
        return f"cannot write {path}: read-only file system; choose an output directory you can write"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"{path}: permission denied (an output directory must be writable by you)"
    if err.errno is not None and err.strerror:
        return f"{path}: {err.strerror}"
    return f"{Path(path)}: {err}"

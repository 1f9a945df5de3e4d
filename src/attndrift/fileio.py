"""File primitives shared by every writer and hasher: atomic writes and content hashes.

A leaf module (it imports nothing of attndrift), so that the dataset cache, checkpoint
loading and the run records all use it without an import circle. A reader of an atomically
written file sees either the previous complete file or the new one. Writes go to a temp file
in the same directory, are fsynced and ``os.replace``d; a failed write (full disk, read-only
filesystem) leaves no temp file behind and raises an `OSError` naming the target. Files get
the permissions the umask allows (0644 under the usual 022), as ``open`` would give them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux /proc)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(err: OSError, path: Path) -> OSError:
    """``err`` as an `OSError` naming ``path`` (the file meant, not a temp file) and the cause:
    ``str()`` reads ``[Errno 28] No space left on device: 'runs/x/record.json'``."""
    return OSError(err.errno, err.strerror or str(err), str(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; respect the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(err, OSError):
            raise write_error(err, path) from None
        raise


def file_sha256(path: Path, limit: int | None = None) -> str:
    """SHA-256 hex of the file's bytes (its first ``limit`` characters when given)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[: limit or None]

"""Writing a report directory so that a reader only ever sees a whole report (issue 24 item 13).

Everything is written into a hidden staging directory next to the target (same filesystem, so
the final moves are renames), and only when every file is written are the report's own entries
(``tables/``, ``figures/``, ``report.md``, ``report.html``, in that order) moved into place.
A full disk, a read-only target, an exception or Ctrl-C while writing leaves the previous report
exactly as it was and no staging directory; the error names the report path it could not write.
Files in the target that are not part of a report are left alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# The entries a report owns, moved in this order: report.html (what a reader opens) comes last.
ENTRIES = ("tables", "figures", "report.md", "report.html")


def _target_name(err: OSError, staging: Path, out_dir: Path) -> str:
    """The path a reader knows: a staging path mapped back into ``out_dir``."""
    name = err.filename
    if name is None:
        return str(out_dir)
    with contextlib.suppress(ValueError):
        return str(out_dir / Path(name).relative_to(staging))
    return str(name)


def _publish(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    trash = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    moved: list[str] = []
    try:
        for entry in ENTRIES:
            old = out_dir / entry
            if old.exists() or old.is_symlink():
                os.rename(old, trash / entry)
            moved.append(entry)
            if (staging / entry).exists():
                os.rename(staging / entry, old)
    except BaseException:  # put the previous report back as it was
        for entry in reversed(moved):
            with contextlib.suppress(OSError):
                if (out_dir / entry).exists():
                    os.rename(out_dir / entry, staging / entry)
                if (trash / entry).exists() or (trash / entry).is_symlink():
                    os.rename(trash / entry, out_dir / entry)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on a clean exit its contents become ``out_dir``'s
    report. An `OSError` is re-raised with the report path it concerns as ``filename``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(20, "not a directory", str(out_dir))
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(err.filename or out_dir)) from err
    try:
        yield staging
        _publish(staging, out_dir)
    except OSError as err:
        raise OSError(err.errno, err.strerror, _target_name(err, staging, out_dir)) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_file(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path``; an error without a file name (a failing ``write``) gets it."""
    try:
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise

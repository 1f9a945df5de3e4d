"""The CLI's consoles and its one way to fail: a one-line message and an exit status."""

from __future__ import annotations

import contextlib
import os
import signal

import typer
from rich.console import Console


def _console(stderr: bool = False) -> Console:
    """A rich console; written to a file or a pipe (a log, CI) it is 160 columns wide instead
    of rich's 80, so tables keep their run names (``COLUMNS`` still decides when set)."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=160)
    return console


out = _console()
err = _console(stderr=True)


def fail(message: str, code: int) -> None:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad input, 1: failure)."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


WRITE_ERRNOS = {13, 28, 30, 122}  # EACCES, ENOSPC, EROFS, EDQUOT


def os_error_line(e: OSError) -> str:
    """An `OSError` as one line naming the path and the cause (full disk, read-only, ...)."""
    if e.filename is None:
        return str(e)
    verb = "cannot write " if e.errno in WRITE_ERRNOS else ""
    return f"{verb}{e.filename}: {e.strerror}"


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (kill, a scheduler's preemption) stops a run as Ctrl-C does: resumable."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

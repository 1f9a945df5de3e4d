"""The CLI's consoles and its one way to fail: a one-line message and an exit status."""

from __future__ import annotations

import contextlib
import os
import signal

import typer
from rich.console import Console
from rich.markup import escape


def _console(stderr: bool = False) -> Console:
    """A rich console; written to a file or a pipe (a log, CI) it is 160 columns wide instead
    of rich's 80, so tables keep their run names (``COLUMNS`` still decides when set)."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=160)
    return console


out = _console()
err = _console(stderr=True)


MAX_MESSAGE = 2000  # characters of one error line; a value is never printed whole


def safe(value: object) -> str:
    """``value`` as text rich prints literally: a run name such as ``x[/]y`` is not markup."""
    return escape(str(value))


def fail(message: str, code: int) -> None:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad input, 1: failure).
    The message is printed as written (never as markup), cut to `MAX_MESSAGE` characters."""
    if len(message) > MAX_MESSAGE:
        message = f"{message[:MAX_MESSAGE]}... ({len(message) - MAX_MESSAGE} more characters)"
    err.print(f"[bold red]error:[/] {safe(message)}", highlight=False, soft_wrap=True)
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


def drift_text(final: dict) -> str:
    """Δ entropy as `compare` and the report read it (the mean over the fixed probe subsets,
    002), with probe subset 0's value labelled next to it (issue 22 item 7)."""
    first = (final.get("delta_pct") or {}).get("entropy")
    mean = (final.get("delta_pct_subset_mean") or {}).get("entropy")
    if not isinstance(mean, int | float):
        return f"Δentropy {first:+.2f}% (probe subset 0)"
    return f"Δentropy {mean:+.2f}% (subset mean; subset 0: {first:+.2f}%)"

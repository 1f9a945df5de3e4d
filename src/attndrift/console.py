"""The CLI's consoles and its one way to fail: a one-line message and an exit status."""

from __future__ import annotations

import os

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

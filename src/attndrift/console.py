"""The CLI's consoles and its one way to fail: a one-line message and an exit status."""

from __future__ import annotations

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)


def fail(message: str, code: int) -> None:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad input, 1: failure)."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)

"""The CLI's look and manners: what users of click and typer tools expect.

typer 0.29 renders help its own way: every flag gets a type (``--help <bool>``), arguments
show as ``{config}`` in the usage line and as ``<list[str]>`` beside their name, and
``--quiet=true`` is refused. `App` (a `typer.Typer`) gives every command it makes the
conventional look instead: ``Usage: attndrift run [OPTIONS] CONFIG [OVERRIDES]...``, option
types as ``PATH``/``TEXT``/``INTEGER``, no type on flags, ``-h`` beside ``--help``, and flags
that also take ``--flag=true|false``.
"""

from __future__ import annotations

import inspect
from typing import Annotated

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", help="config override (repeatable); same as a positional "
                                        "KEY=VALUE")]
_NAMES = {str: "TEXT", int: "INTEGER", float: "FLOAT", bool: "BOOLEAN"}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _type_label(param: TyperArgument | TyperOption) -> str:
    """``PATH``, ``TEXT``, ``INTEGER``, ``[a|b]``: click's names for a parameter's type."""
    desc = param.type_descriptor
    if desc.is_choice and desc.choices is not None:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in desc.choices) + "]"
    if desc.is_path:
        return "PATH"
    annotation = desc.annotation
    args = getattr(annotation, "__args__", ())
    if desc.is_list and args:
        annotation = args[0]
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)).upper())


def _unwrap(text: str | None) -> str | None:
    """Docstring paragraphs as click prints them: line breaks inside a paragraph are spaces
    (typer keeps them, so a wrapped docstring prints ragged)."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


class _Argument(TyperArgument):
    def _usage_display_name(self) -> str:
        name = self.metavar or (self.name or "").upper()
        if self.nargs != 1 and not name.endswith("..."):
            name += "..."
        return name if self.required or name.startswith("[") else f"[{name}]"

    def display_type_rich(self, ctx) -> str | None:
        return _type_label(self)


class _Option(TyperOption):
    def display_type_rich(self, ctx) -> str | None:
        if self.is_flag or self.count:
            return None
        return self.metavar or _type_label(self)


def _conventional(params: list) -> list:
    for param in params:  # same objects, conventional rendering (methods only, no state)
        if type(param) is TyperArgument:
            if param.metavar is None:
                param.metavar = (param.name or "").upper() + ("..." if param.nargs != 1 else "")
            param.__class__ = _Argument
        elif type(param) is TyperOption:
            param.__class__ = _Option
    return params


def _flag_values(params: list, args: list[str]) -> list[str]:
    """``--quiet=true`` -> ``--quiet``, ``--quiet=false`` -> nothing (or ``--no-quiet``):
    flags written the way many other tools accept them."""
    flags = {opt: p for p in params if isinstance(p, TyperOption) and p.is_bool_flag
             for opt in (*p.opts, *p.secondary_opts)}
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":  # the rest is positional
            out += args[i:]
            break
        opt, sep, value = arg.partition("=")
        param = flags.get(opt) if sep and opt.startswith("--") else None
        if param is None or value.lower() not in TRUE + FALSE:
            out.append(arg)
            continue
        on = (value.lower() in TRUE) == (opt in param.opts)
        if on:
            out.append(param.opts[0])
        elif param.secondary_opts:
            out.append(param.secondary_opts[0])
    return out


class ConventionalCommand(TyperCommand):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help = _unwrap(self.help)

    def get_params(self, ctx) -> list:
        return _conventional(super().get_params(ctx))

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _flag_values(self.get_params(ctx), args))


class ConventionalGroup(TyperGroup):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help = _unwrap(self.help)

    def get_params(self, ctx) -> list:
        return _conventional(super().get_params(ctx))


class App(typer.Typer):
    """`typer.Typer` whose commands and groups look conventional; ``-h`` works everywhere."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("cls", ConventionalGroup)
        kwargs.setdefault("context_settings", {"help_option_names": ["-h", "--help"]})
        super().__init__(**kwargs)

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or ConventionalCommand, **kwargs)

"""Reading config YAML: safe, bounded, and every problem one line.

PyYAML's `SafeLoader` executes nothing, but it happily builds a small document whose aliases
expand to billions of values (9 levels x 9 aliases: 529 bytes, 9^9 leaves); everything
downstream that copies, validates or prints the value then runs out of memory. `parse_yaml`
counts what the aliases expand to, on the composed node graph (each node once), and refuses a
document above `MAX_VALUES` before anything is built. Nesting deeper than Python's recursion
limit is refused the same way.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_VALUES = 100_000  # scalars + collections after alias expansion; a study spec has < 1,000
MAX_SHOWN = 80  # characters of a user's value quoted in an error message


class YamlError(ValueError):
    """The text is not YAML a config may hold; ``str(err)`` is one line."""


def shorten(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error never prints a whole value."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def looks_numeric(text: str) -> bool:
    """Whether ``text`` reads as a number, e.g. a quoted ``"1e-4"`` that YAML left a string."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """How many values ``root`` holds once every alias is expanded; stops counting above
    ``limit``. Linear in the number of distinct nodes (aliases share their node)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise YamlError("a YAML alias refers to the collection that contains it")
        total = 1
        if isinstance(node, yaml.SequenceNode | yaml.MappingNode):
            active.add(key)
            children = (node.value if isinstance(node, yaml.SequenceNode)
                        else [n for pair in node.value for n in pair])
            for child in children:
                total += size(child)
                if total > limit:
                    break
            active.discard(key)
        sizes[key] = min(total, limit + 1)
        return sizes[key]

    return size(root)


class _Loader(yaml.SafeLoader):
    def construct_document(self, node: yaml.Node) -> Any:
        if _expanded_size(node, MAX_VALUES) > MAX_VALUES:
            raise YamlError(f"its aliases (*name) expand to more than {MAX_VALUES:,} values; "
                            "write the values out or use fewer aliases")
        return super().construct_document(node)


# PyYAML follows YAML 1.1, where "1e-4" (no dot) is a string: accept every float spelling.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+][0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """``text`` as plain data (dicts, lists, scalars); raises `YamlError` (one line, with the
    line number where YAML gives one) on malformed YAML, alias bombs and runaway nesting."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise YamlError(f"{where}not valid YAML ({err.problem or err.context})") from None
    except yaml.YAMLError as err:
        raise YamlError(f"not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise YamlError("nested too deeply to read") from None

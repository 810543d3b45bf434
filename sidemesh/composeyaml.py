"""A small YAML writer for compose files that people read: comments, anchors, merge keys.

PyYAML's emitter drops comments and names anchors ``&id001``; a generated compose file is
read and diffed by people, so ``sidemesh compose`` writes its own text. The values it takes
are few: mappings (``dict``; a ``Comment`` key is a comment line), block lists (``list``),
flow lists (``Flow``, wrapped like a hand-written ``command: [...]``), scalars, an anchored
mapping (``Anchored``) and an alias (``Alias``, the value of a ``<<`` merge key).

Strings are written plain only when YAML 1.1 (docker-compose 1.29) and 1.2 (compose v2)
both read them back as the same string; anything else is double-quoted with JSON's escapes,
which are valid YAML. tests/unit/test_compose_file.py loads every output back with PyYAML.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

WIDTH = 110
INDENT = "  "

# a word, a path, or a duration such as 10s (never a YAML number: those need no letter)
_PLAIN = re.compile(r"^([A-Za-z_/.][A-Za-z0-9_./-]*|[0-9]+(ms|s|m|h))\Z")
# words YAML 1.1 reads as booleans or null; numbers never pass _PLAIN (they start with a digit)
_YAML11_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


@dataclass(frozen=True, eq=False)
class Comment:
    """A comment line in a mapping (a key whose value is ignored); eq=False: each is its own key."""

    text: str


@dataclass(frozen=True)
class Alias:
    """``*name``: the value of a ``<<`` merge key."""

    name: str


@dataclass(frozen=True)
class Anchored:
    """A mapping that defines ``&name``."""

    name: str
    mapping: Mapping[object, object]


@dataclass(frozen=True)
class Flow:
    """A list of scalars written ``["a", "b", ...]``, wrapped under its first item."""

    items: Sequence[object]


def scalar(value: object, *, quote: bool = False) -> str:
    """``value`` as YAML: plain where that is unambiguous (never when ``quote``), else quoted."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if not quote and _PLAIN.match(text) and text.lower() not in _YAML11_WORDS:
        return text
    return json.dumps(text)


def document(mapping: Mapping[object, object]) -> str:
    """The text of a YAML document whose top level is ``mapping``, ending in a newline."""
    return "".join(line + "\n" for line in _mapping(mapping, 0))


def _mapping(mapping: Mapping[object, object], depth: int) -> list[str]:
    pad = INDENT * depth
    lines: list[str] = []
    for key, value in mapping.items():
        if isinstance(key, Comment):
            lines += [f"{pad}# {t}".rstrip() if t else f"{pad}#" for t in key.text.split("\n")] if key.text else [""]
            continue
        head = f"{pad}{key}:"
        if isinstance(value, Anchored):
            lines.append(f"{head} &{value.name}")
            lines += _mapping(value.mapping, depth + 1)
        elif isinstance(value, Alias):
            lines.append(f"{head} *{value.name}")
        elif isinstance(value, Mapping):
            if value:
                lines.append(head)
                lines += _mapping(value, depth + 1)
            else:
                lines.append(f"{head} {{}}")
        elif isinstance(value, Flow):
            lines += _flow(head, value.items)
        elif isinstance(value, list | tuple):
            lines.append(head)
            for item in value:
                if isinstance(item, Mapping):
                    inner = _mapping(item, depth + 2)
                    lines.append(f"{pad}{INDENT}- {inner[0].lstrip()}")
                    lines += inner[1:]
                else:
                    lines.append(f"{pad}{INDENT}- {scalar(item)}")
        else:
            text = scalar(value)
            lines.append(f"{head} {text}" if text else head)
    return lines


def _flow(head: str, items: Sequence[object]) -> list[str]:
    """``key: ["a", "b",`` then further lines under the first item, each within WIDTH if it can be."""
    texts = [scalar(i, quote=True) for i in items]  # an argv reads best with every word quoted
    lines: list[str] = []
    current = f"{head} ["
    indent = " " * len(current)
    for i, text in enumerate(texts):
        piece = text + ("]" if i == len(texts) - 1 else ",")
        if current.endswith(("[", ",")) and not current.endswith("["):
            candidate = f"{current} {piece}"
            if len(candidate) > WIDTH:
                lines.append(current)
                current = f"{indent}{piece}"
                continue
            current = candidate
        else:
            current += piece
    if not texts:
        current += "]"
    lines.append(current)
    return lines

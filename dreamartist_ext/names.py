"""Concept names: what a user may call a learned word, and how its negative partner is named.

A concept name ends up in three places: a file stem under the host's ``embeddings/`` folder, a word in a
prompt, and a word in the negative prompt (``name-neg``). The rules below keep all three working.
"""
from __future__ import annotations

import string
from typing import Iterable

NEG_SUFFIX = "-neg"
MAX_NAME_LENGTH = 64

# ASCII only: the prompt word must tokenize exactly like the file stem the host derives the embedding name
# from, and the host's prompt syntax uses ()[]:<>|, — none of which may appear in a name.
_ALLOWED_CHARACTERS = frozenset(string.ascii_letters + string.digits + "_-.")

# Windows refuses these as file names, with or without an extension ("con.safetensors" too).
_WINDOWS_DEVICE_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"COM{i}" for i in range(1, 10)] + [f"LPT{i}" for i in range(1, 10)]
)


class InvalidNameError(ValueError):
    """A concept name that cannot be used; the message says exactly why."""


def validate_concept_name(name: str) -> str:
    """Return ``name`` unchanged if it is a usable concept name, else raise InvalidNameError."""
    if not isinstance(name, str):
        raise TypeError(f"concept name must be a string, got {type(name).__name__}")
    problem = _first_problem(name)
    if problem is not None:
        raise InvalidNameError(f"invalid concept name {name!r}: {problem}")
    return name


def _first_problem(name: str) -> str | None:
    if not name.strip():
        return "the name is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"the name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}"
    if name != name.strip():
        return "the name starts or ends with whitespace"
    for separator in ("/", "\\"):
        if separator in name:
            return f"the name contains the path separator {separator!r}"
    if ".." in name:
        return "the name contains '..'"
    if name[0] in ".-":
        return f"the name starts with {name[0]!r}"
    for position, character in enumerate(name):
        if character not in _ALLOWED_CHARACTERS:
            return (
                f"character {character!r} at position {position} is not allowed "
                "(use letters A-Z/a-z, digits, '_', '-' or '.')"
            )
    if name.lower().endswith(NEG_SUFFIX):
        return f"names ending in {NEG_SUFFIX!r} are reserved: the negative partner gets that name automatically"
    if name.split(".")[0].upper() in _WINDOWS_DEVICE_NAMES:
        return f"{name.split('.')[0]!r} is a reserved device name on Windows"
    return None


def negative_name(name: str) -> str:
    """The name of the negative embedding that pairs with concept ``name``."""
    return name + NEG_SUFFIX


def clashing_names(name: str, existing: Iterable[str]) -> list[str]:
    """Existing names (file stems) that ``name`` or ``name-neg`` would collide with.

    Case-insensitive because CLIP lower-cases prompts: 'Cat' and 'cat' are the same word, so creating one
    while the other exists would shadow it (or be shadowed) in every prompt.
    """
    taken = {name.lower(), negative_name(name).lower()}
    return [other for other in existing if other.lower() in taken]

"""Concept names: what a user may call a learned word, and how its negative partner is named.

A concept name ends up in three places: a file stem under the host's ``embeddings/`` folder, a word in a
prompt, and a word in the negative prompt (``name-neg``). The host takes any file stem as an embedding name and
finds it in a prompt by its tokens, so a name may be written in any script (``猫の絵``) and hold inner spaces. The
rules below refuse only what breaks one of the three places: path syntax, the host's prompt syntax, characters a
file system or a prompt cannot carry, and names Windows reserves.
"""
from __future__ import annotations

import unicodedata
from typing import Iterable

from .errors import InvalidInput

NEG_SUFFIX = "-neg"
MAX_NAME_LENGTH = 64  # characters; 64 CJK characters + "-neg.safetensors" stay under 255 bytes of UTF-8
NAME_RULES = (f"Letters and digits of any script, '_', '-', '.' and single inner spaces; at most {MAX_NAME_LENGTH} "
              f"characters. The negative is saved as name{NEG_SUFFIX}")

_ALLOWED_PUNCTUATION = frozenset("_-.")
# Letters, marks (the vowel signs of Devanagari, Thai ...: part of the letters of those scripts) and digits.
# Everything else - the host's prompt syntax ()[]:<>|, and \, characters Windows refuses in file names (*?"), emoji,
# control and format characters - is refused.
_ALLOWED_CATEGORIES = ("L", "M", "N")

# Windows refuses these as file names, with or without an extension ("con.safetensors" too).
_WINDOWS_DEVICE_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"COM{i}" for i in range(1, 10)] + [f"LPT{i}" for i in range(1, 10)]
)


class InvalidNameError(InvalidInput):
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
    if "  " in name:
        return "the name has two spaces in a row (a prompt cannot tell them from one)"
    for position, character in enumerate(name):
        if not _allowed(character):
            return (
                f"character {character!r} at position {position} is not allowed "
                "(use letters, digits, '_', '-', '.' or single spaces)"
            )
    if not unicodedata.is_normalized("NFC", name):
        return "the name uses decomposed accents; write it in composed form (NFC), as keyboards type it"
    if name.lower().endswith(NEG_SUFFIX):
        return f"names ending in {NEG_SUFFIX!r} are reserved: the negative partner gets that name automatically"
    if name.split(".")[0].upper() in _WINDOWS_DEVICE_NAMES:
        return f"{name.split('.')[0]!r} is a reserved device name on Windows"
    return None


def _allowed(character: str) -> bool:
    return (character in _ALLOWED_PUNCTUATION or character == " "
            or unicodedata.category(character).startswith(_ALLOWED_CATEGORIES))


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

"""Learned words in prompts, as plain text: which concept names a prompt uses, which ``name-neg`` words a
negative prompt still lacks, and how the infotext records what DreamArtist applied.

The rules follow how AUTOMATIC1111 v1.10 finds embeddings in a prompt, so that a name found here is a name the
host injects:
- ``AND`` splits the prompt into sub-prompts (each with an optional ``:weight``);
- prompt editing ``[a:b:0.5]`` / ``[a:0.5]`` / ``[a::0.5]`` and alternation ``[a|b]`` give several texts; every
  variant counts, whatever the step numbers;
- emphasis ``(a)``, ``(a:1.2)``, ``[a]`` splits a text into groups of equal weight, and each group is tokenized on
  its own, so a name never spans two groups; ``BREAK`` splits too;
- CLIP lower-cases text and cuts it into runs of letters, single digits and runs of other symbols; a name matches
  a run of those pieces, the longest known word first - so ``mycat-neg`` is never counted as ``mycat``.
The host matches on BPE tokens, which can also find a name inside a longer word; inside the host,
``webui.prompts`` asks the host's own tokenizer. The plain-text rules here serve the JavaScript side's mirror,
the batch script's prompt building, and a cheap "might this prompt mention a name?" check.
"""

from __future__ import annotations

import html
import itertools
import json
import re
from typing import Iterable, Mapping, Sequence

from .names import negative_name

INFOTEXT_KEY = "DreamArtist"  # "mycat:1.0, other:0.8": adapters applied, with their weights
AUTO_NEGATIVE_KEY = "DreamArtist auto-negative"  # the words added to the negative prompt, or "off"
AUTO_NEGATIVE_OFF = "off"
MAX_VARIANTS = 64  # prompt-editing combinations enumerated exactly; beyond that each choice is varied alone

# -- prompt structure -----------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_SUBPROMPT_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
_SCHEDULE_NUMBER = re.compile(r"^\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*$")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # <lora:...>: removed by the host before encoding
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
# CLIP's pre-tokenizer: contractions, letter runs, single digits, runs of anything else but whitespace.
_PIECE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


class _Choice(list):
    """One prompt-editing construct: the texts it can stand for (each a parsed sequence)."""


def subprompts(prompt: str) -> list[str]:
    """The texts of an ``AND``-composed prompt, weights removed."""
    out = []
    for part in _AND.split(prompt):
        match = _SUBPROMPT_WEIGHT.search(part)
        out.append(match.group(1) if match else part)
    return out


def _closing_bracket(text: str, start: int) -> tuple[int, list[int], list[int]] | None:
    """Index of the ']' closing the '[' at ``start``, with the top-level '|' and ':' positions inside."""
    depth, bars, colons = 0, [], []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch in "([":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif ch == "]":
            if depth == 0:
                return i, bars, colons
            depth -= 1
        elif depth == 0 and ch == "|":
            bars.append(i)
        elif depth == 0 and ch == ":":
            colons.append(i)
        i += 1
    return None


def _parse_editing(text: str) -> list:
    """``text`` as a sequence of literal strings and _Choice objects (prompt editing and alternation)."""
    items: list = []
    literal = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            literal.append(text[i:i + 2])
            i += 2
            continue
        closing = _closing_bracket(text, i) if ch == "[" else None
        if closing is None:
            literal.append(ch)
            i += 1
            continue
        end, bars, colons = closing
        inner = text[i + 1:end]
        choice = None
        if bars and not colons:  # [a|b|c]; an empty option stands for nothing
            cuts = [i + 1] + [b + 1 for b in bars]
            stops = bars + [end]
            choice = _Choice(_parse_editing(text[a:b]) for a, b in zip(cuts, stops))
        elif not bars and len(colons) in (1, 2) and _SCHEDULE_NUMBER.match(text[colons[-1] + 1:end]):
            if len(colons) == 1:  # [to:when]: nothing, then "to"
                choice = _Choice([[], _parse_editing(text[i + 1:colons[0]])])
            else:  # [from:to:when]
                choice = _Choice([_parse_editing(text[i + 1:colons[0]]), _parse_editing(text[colons[0] + 1:colons[1]])])
        if choice is None:  # emphasis [a] (or something the host leaves as text): keep the brackets
            literal.append("[")
            items.append("".join(literal))
            literal = []
            items.extend(_parse_editing(inner))
            literal.append("]")
        else:
            items.append("".join(literal))
            literal = []
            items.append(choice)
        i = end + 1
    items.append("".join(literal))
    return [item for item in items if not (isinstance(item, str) and not item)]


def _choices(items: list) -> list[_Choice]:
    found = []
    for item in items:
        if isinstance(item, _Choice):
            found.append(item)
            for option in item:
                found.extend(_choices(option))
    return found


def _render(items: list, pick: Mapping[int, int]) -> str:
    out = []
    for item in items:
        if isinstance(item, _Choice):
            out.append(_render(item[pick.get(id(item), 0)], pick))
        else:
            out.append(item)
    return "".join(out)


def editing_variants(text: str, limit: int = MAX_VARIANTS) -> list[str]:
    """Every text that prompt editing / alternation in ``text`` can produce at some step.

    Up to ``limit`` combinations are enumerated exactly; beyond that each choice is varied on its own (the other
    choices at their first option), which still shows every option's text with its neighbours.
    """
    items = _parse_editing(text)
    choices = _choices(items)
    if not choices:
        return [text]
    sizes = [len(c) for c in choices]
    total = 1
    for size in sizes:
        total *= size
    if total <= limit:
        picks = [dict(zip(map(id, choices), combo)) for combo in itertools.product(*(range(s) for s in sizes))]
    else:
        picks = [{}] + [{id(c): k} for c in choices for k in range(1, len(c))]
    variants = [text]  # the host encodes the text as it is when its grammar rejects it
    for pick in picks:
        rendered = _render(items, pick)
        if rendered not in variants:
            variants.append(rendered)
    return variants


def emphasis_groups(text: str) -> list[str]:
    """The pieces of ``text`` the host tokenizes separately: runs of equal attention weight, split at BREAK."""
    groups: list[list] = []  # [text, weight]; a BREAK is ["BREAK", -1.0] until a bracket rescales it (as in the host)
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for group in groups[start:]:
            group[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            groups.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(groups))
        elif token == "[":
            square_open.append(len(groups))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    groups.append(["BREAK", -1.0])
                groups.append([part, 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)
    merged: list[list] = []
    for group in groups:
        if merged and merged[-1][1] == group[1]:
            merged[-1][0] += group[0]
        else:
            merged.append(list(group))
    return [t for t, w in merged if t and not (t == "BREAK" and w == -1.0)]


def pieces(text: str) -> list[str]:
    """CLIP's pre-tokenization of ``text``: lower-cased letter runs, digits and symbol runs."""
    cleaned = " ".join(html.unescape(html.unescape(text)).split()).lower()
    return _PIECE.findall(cleaned)


def encoded_texts(prompt: str, *, negative: bool = False) -> list[str]:
    """The texts the host encodes for ``prompt``, split where the host tokenizes separately."""
    if negative:  # the host neither splits AND nor strips <lora:...> in the negative prompt
        texts = [prompt]
    else:
        texts = subprompts(_EXTRA_NETWORK.sub("", prompt))
    out = []
    for text in texts:
        for variant in editing_variants(text):
            out.extend(emphasis_groups(variant))
    return out


# -- finding words --------------------------------------------------------------------------------------------


def find_words(prompt: str, words: Iterable[str], *, negative: bool = False) -> list[str]:
    """The ``words`` (embedding names) a prompt uses, in order of first use; longest match wins, as in the host."""
    by_first: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for word in words:
        key = tuple(pieces(word))
        if key:
            by_first.setdefault(key[0], []).append((key, word))
    for candidates in by_first.values():
        candidates.sort(key=lambda item: -len(item[0]))
    found: list[str] = []
    for text in encoded_texts(prompt, negative=negative):
        seq = pieces(text)
        i = 0
        while i < len(seq):
            for key, word in by_first.get(seq[i], ()):
                if tuple(seq[i:i + len(key)]) == key:
                    if word not in found:
                        found.append(word)
                    i += len(key)
                    break
            else:
                i += 1
    return found


def find_learned_names(prompt: str, names: Iterable[str], other_words: Iterable[str] = ()) -> list[str]:
    """Concept ``names`` used in a positive prompt (``name-neg`` and ``other_words`` compete, longest first)."""
    names = list(names)
    candidates = dict.fromkeys([*names, *(negative_name(n) for n in names), *other_words])
    wanted = set(names)
    return [word for word in find_words(prompt, candidates) if word in wanted]


def may_mention(prompt: str, names: Iterable[str]) -> bool:
    """False only when no name can be in ``prompt`` - a cheap test before asking the host's tokenizer.

    Without brackets or escapes the host encodes the prompt's own characters, so a name it finds (even inside
    a word) is a substring; with them, the answer is "maybe".
    """
    if any(ch in prompt for ch in "[(\\"):
        return True
    lowered = html.unescape(html.unescape(prompt)).lower()
    return any(name.lower() in lowered for name in names)


# -- the negative prompt --------------------------------------------------------------------------------------


def append_words(prompt: str, words: Sequence[str]) -> str:
    """``prompt`` with ``words`` appended as comma-separated items."""
    if not words:
        return prompt
    addition = ", ".join(words)
    stripped = prompt.rstrip()
    if not stripped:
        return addition
    separator = " " if stripped.endswith(",") else ", "
    return stripped + separator + addition


def missing_negatives(negative_prompt: str, names: Iterable[str], present: Iterable[str] | None = None) -> list[str]:
    """``name-neg`` of each of ``names`` that the negative prompt does not use yet.

    ``present``: the words the negative prompt uses, when the caller knows them exactly (the host's tokenizer);
    otherwise they are found with :func:`find_words`.
    """
    wanted = list(dict.fromkeys(negative_name(n) for n in names))
    if present is None:
        present = find_words(negative_prompt, wanted, negative=True)
    present = set(present)
    return [word for word in wanted if word not in present]


def complete_negative(negative_prompt: str, names: Iterable[str],
                      present: Iterable[str] | None = None) -> tuple[str, list[str]]:
    """The negative prompt with every missing ``name-neg`` appended, and the words added. Idempotent."""
    added = missing_negatives(negative_prompt, names, present)
    return append_words(negative_prompt, added), added


# -- infotext -------------------------------------------------------------------------------------------------


def _number(value: float) -> str:
    return repr(float(round(float(value), 4)))


def format_applied(weights: Mapping[str, float]) -> str:
    """Infotext value for the adapters applied: ``mycat:1.0, other:0.8``."""
    return ", ".join(f"{name}:{_number(weight)}" for name, weight in weights.items())


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return str(json.loads(text))
        except ValueError:
            return text[1:-1]
    return text


def parse_applied(text: str) -> dict[str, float]:
    """Inverse of :func:`format_applied` (also accepts the quoted form the infotext line has)."""
    out: dict[str, float] = {}
    text = _unquote(text)
    if not text:
        return out
    for item in text.split(","):
        name, sep, weight = item.strip().rpartition(":")
        if not sep or not name.strip():
            raise ValueError(f"{INFOTEXT_KEY} entry {item.strip()!r} is not 'name:weight'")
        try:
            out[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"{INFOTEXT_KEY} entry {item.strip()!r} has no numeric weight") from None
    return out


def format_added(words: Sequence[str]) -> str:
    """Infotext value for the negative words added automatically: ``mycat-neg, other-neg``."""
    return ", ".join(words)


def parse_added(text: str) -> list[str] | None:
    """Inverse of :func:`format_added`; None when the value says auto-negative was off."""
    text = _unquote(text)
    if text == AUTO_NEGATIVE_OFF:
        return None
    return [word.strip() for word in text.split(",") if word.strip()]

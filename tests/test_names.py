from __future__ import annotations

import pytest

from dreamartist_ext.names import (
    NEG_SUFFIX,
    InvalidNameError,
    clashing_names,
    negative_name,
    validate_concept_name,
)


@pytest.mark.parametrize(
    "name",
    ["cat", "Cat_Toy", "my-cat", "style.v2", "a", "x" * 64, "neg", "cat-neg2", "console", "COM10", "lpt0", "con_art",
     # the host takes any file stem and matches it by tokens: names in the user's own script, with inner spaces
     "猫の絵", "my cat", "café", "Ünïcødé", "हिन्दी", "кошка 2", "猫" * 64],
)
def test_valid_names_are_returned_unchanged(name):
    assert validate_concept_name(name) is name


@pytest.mark.parametrize(
    "name, expected_message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("\t\n", "empty"),
        ("x" * 65, "65 characters long; the limit is 64"),
        (" cat", "whitespace"),
        ("cat ", "whitespace"),
        ("cats/dogs", "path separator '/'"),
        ("cats\\dogs", "path separator '\\\\'"),
        ("cat..dog", "'..'"),
        (".cat", "starts with '.'"),
        ("-cat", "starts with '-'"),
        ("my  cat", "two spaces in a row"),
        ("my\tcat", "character '\\t' at position 2"),
        ("cat\x00", "character '\\x00' at position 3"),
        ("cat\u200bdog", "character '\\u200b' at position 3"),  # zero-width space: invisible in a prompt
        ("cafe\u0301", "composed form (NFC)"),
        ("猫" * 65, "65 characters long"),
        ("cat*", "character '*'"),
        ("cat?", "character '?'"),
        ("cat|dog", "character '|'"),
        ("cat🐱", "character '🐱'"),
        ("cat(1)", "character '(' at position 3"),
        ("cat:0.5", "character ':' at position 3"),
        ("cat,dog", "character ','"),
        ("<lora>", "character '<'"),
        ("猫の絵-neg", "reserved"),
        ("nul", "reserved device name"),
        ("cat-neg", "reserved"),
        ("cat-NEG", "reserved"),
        ("CON", "reserved device name"),
        ("con", "reserved device name"),
        ("Aux", "reserved device name"),
        ("nul.v2", "reserved device name"),
        ("COM1", "reserved device name"),
        ("com9", "reserved device name"),
        ("LPT1", "reserved device name"),
        ("lpt9", "reserved device name"),
        ("prn", "reserved device name"),
    ],
)
def test_invalid_names_say_what_is_wrong(name, expected_message):
    with pytest.raises(InvalidNameError) as raised:
        validate_concept_name(name)
    message = str(raised.value)
    assert expected_message in message
    assert repr(name) in message  # the offending name is quoted back to the user


def test_invalid_name_error_is_a_value_error():
    assert issubclass(InvalidNameError, ValueError)


def test_non_string_name_is_a_type_error():
    with pytest.raises(TypeError):
        validate_concept_name(None)  # type: ignore[arg-type]


def test_negative_name_appends_suffix_and_is_itself_reserved():
    assert NEG_SUFFIX == "-neg"
    assert negative_name("cat") == "cat-neg"
    with pytest.raises(InvalidNameError, match="reserved"):
        validate_concept_name(negative_name("cat"))


def test_clashing_names_finds_case_insensitive_collisions_with_name_and_partner():
    existing = ["dog", "CAT", "cat-NEG", "Cat-neg2", "caterpillar", "cat", "neg"]
    assert clashing_names("Cat", existing) == ["CAT", "cat-NEG", "cat"]


def test_clashing_names_empty_when_nothing_collides():
    assert clashing_names("cat", ["dog", "dog-neg", "cats", "cat-negative"]) == []
    assert clashing_names("cat", iter(())) == []

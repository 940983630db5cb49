"""Learned names in prompts, negative-prompt completion and the infotext fields (pure text logic)."""

from __future__ import annotations

import pytest

from dreamartist_ext import prompt_words as pw

NAMES = ["mycat", "Other_Style"]


@pytest.mark.parametrize("prompt, expected", [
    ("a photo of mycat", ["mycat"]),
    ("a photo of MyCat on grass", ["mycat"]),  # CLIP lower-cases
    ("other_style, mycat", ["Other_Style", "mycat"]),  # order of first use
    ("mycat-neg", []),  # the partner is the longer match, never the name itself
    ("mycat-negative", ["mycat"]),  # "-negative" is not the partner: mycat, '-', negative
    ("mycats and mycatfish", []),  # a longer letter run is another word
    ("mycat2, 3mycat", ["mycat"]),  # digits are pieces of their own
    ("a dog", []),
    ("", []),
])
def test_finds_names_like_the_host_tokenizer(prompt, expected):
    assert pw.find_learned_names(prompt, NAMES) == expected


@pytest.mark.parametrize("prompt, expected", [
    ("a (mycat:1.3) on a table", ["mycat"]),
    ("((mycat)), [other_style]", ["mycat", "Other_Style"]),
    ("(my)(cat)", ["mycat"]),  # equal weights merge into one group: the host sees "mycat"
    ("my(cat)", []),  # different weights are tokenized separately
    ("\\(mycat\\)", ["mycat"]),
    ("a dog BREAK mycat", ["mycat"]),
    ("a dogBREAKmycat", []),  # no word boundary: plain text
    ("a cat AND mycat:0.7", ["mycat"]),
    ("a [dog:mycat:0.5]", ["mycat"]),  # prompt editing: every variant counts
    ("a [mycat:dog:10]", ["mycat"]),
    ("a [mycat::0.2] dog", ["mycat"]),
    ("a [mycat:5] dog", ["mycat"]),
    ("a [dog|mycat] in a box", ["mycat"]),
    ("my[cat:dog:0.5]", ["mycat"]),  # variants join with their neighbours
    ("[my|a]cat", ["mycat"]),
    ("a [[mycat]] photo", ["mycat"]),  # nested emphasis, not editing
    ("<lora:mycat:1> a photo", []),  # extra-network syntax is removed by the host
])
def test_prompt_syntax(prompt, expected):
    assert pw.find_learned_names(prompt, NAMES) == expected


def test_other_words_compete_longest_first():
    assert pw.find_learned_names("mycat-neg2 mycat", ["mycat"], other_words=["mycat-neg2"]) == ["mycat"]
    assert pw.find_learned_names("mycat-neg2", ["mycat"], other_words=["mycat-neg2"]) == []


def test_editing_variants_are_bounded():
    prompt = " ".join(f"[a{i}|b{i}]" for i in range(10))  # 1024 combinations
    variants = pw.editing_variants(prompt)
    assert len(variants) <= 2 + 10
    assert any("b9" in v for v in variants) and any("a0" in v for v in variants)
    assert pw.find_learned_names(prompt + " [x|mycat]", NAMES) == ["mycat"]


def test_may_mention_is_a_cheap_superset():
    assert not pw.may_mention("a photo of a dog", NAMES)
    assert pw.may_mention("a photo of xmycatx", NAMES)  # BPE may find it inside a word
    assert pw.may_mention("a (photo) of a dog", NAMES)  # syntax: cannot tell without parsing
    assert pw.may_mention("OTHER_STYLE", NAMES)


def test_negative_completion_is_idempotent():
    negative, added = pw.complete_negative("lowres, blurry", ["mycat", "Other_Style"])
    assert negative == "lowres, blurry, mycat-neg, Other_Style-neg"
    assert added == ["mycat-neg", "Other_Style-neg"]
    again, added_again = pw.complete_negative(negative, ["mycat", "Other_Style"])
    assert (again, added_again) == (negative, [])


def test_negative_completion_keeps_what_is_there():
    assert pw.complete_negative("", ["mycat"]) == ("mycat-neg", ["mycat-neg"])
    assert pw.complete_negative("blurry,  ", ["mycat"]) == ("blurry, mycat-neg", ["mycat-neg"])
    assert pw.complete_negative("(MyCat-neg:1.2), blurry", ["mycat"]) == ("(MyCat-neg:1.2), blurry", [])
    # a caller that knows the injected words exactly (the host tokenizer) decides
    assert pw.missing_negatives("whatever", ["mycat"], present={"mycat-neg"}) == []
    assert pw.missing_negatives("mycat-neg", ["mycat"], present=set()) == ["mycat-neg"]


def test_infotext_round_trip():
    weights = {"mycat": 1.0, "Other_Style": 0.8, "x.y": 0.125}
    text = pw.format_applied(weights)
    assert text == "mycat:1.0, Other_Style:0.8, x.y:0.125"
    assert pw.parse_applied(text) == weights
    assert pw.parse_applied('"' + text + '"') == weights  # as the infotext line quotes it
    assert pw.parse_applied("") == {}
    added = ["mycat-neg", "Other_Style-neg"]
    assert pw.parse_added(pw.format_added(added)) == added
    assert pw.parse_added(pw.AUTO_NEGATIVE_OFF) is None


def test_infotext_round_trip_through_the_host_format():
    # The host writes 'Key: value' items joined by ", " and quotes values holding ',' ':' or newlines
    import json

    value = pw.format_applied({"mycat": 1.0, "other": 0.8})
    line = f"Steps: 4, {pw.INFOTEXT_KEY}: {json.dumps(value)}, Seed: 1"
    quoted = line.split(f"{pw.INFOTEXT_KEY}: ", 1)[1].split(", Seed")[0]
    assert pw.parse_applied(quoted) == {"mycat": 1.0, "other": 0.8}


@pytest.mark.parametrize("bad", ["mycat", "mycat:heavy", ":1.0"])
def test_malformed_infotext_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="DreamArtist"):
        pw.parse_applied(bad)

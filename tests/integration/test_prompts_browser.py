"""The txt2img prompts in a real browser: the prompt JavaScript (a typed learned word gets its partner in the
negative prompt; a deleted partner stays deleted; a look-alike word is not the concept; with auto-negative off a
hint offers the partner) and the extra-networks cards (the concept's Textual Inversion card gives name + name-neg,
the partner and the adapters have no card, other embeddings keep the host's own card).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from browser_driver import MISSING, run_driver
from webui_host import start_webui, tracebacks

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "probe"))
from concept_files import adapter_shapes, write_concept  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]
CONCEPT, PLAIN_CONCEPT, PLAIN_EMBEDDING = "mycat", "plainpair", "plainemb"


@pytest.fixture(scope="module")
def seen(host_setup, tmp_path_factory):
    """One host with a concept with adapters, one without, and an ordinary embedding; the driver's observations."""
    from dreamartist_ext import files

    data = tmp_path_factory.mktemp("prompts-browser-host")
    shapes = adapter_shapes(host_setup.checkpoint_dir / "tiny.safetensors", host_setup.checkpoint_dir / "tiny.yaml",
                            text_layers=1)
    write_concept(data, CONCEPT, shapes, seed=1)
    write_concept(data, PLAIN_CONCEPT, None, seed=2)
    files.save_embedding(data / "embeddings" / f"{PLAIN_EMBEDDING}.safetensors", torch.randn(1, 768) * 0.3, {})
    host = start_webui(host_setup, data)
    log_start = len(host.log())
    try:
        observed = run_driver("drive_prompts.js", {
            "url": host.url, "concept": CONCEPT, "plainConcept": PLAIN_CONCEPT, "plainEmbedding": PLAIN_EMBEDDING,
            "userDataDir": str(tmp_path_factory.mktemp("chromium-profile")),
        })
        observed["log"] = host.log()[log_start:]
    finally:
        host.stop()
    return observed


def test_typing_the_word_adds_its_partner_once(seen):
    assert seen["afterTyping"] == {"prompt": f"a photo of {CONCEPT}", "negative": f"{CONCEPT}-neg"}
    # deleted by the user while the word stays: not added again on the next keystrokes
    assert seen["afterDeletingPartner"]["negative"] == "blurry", seen["afterDeletingPartner"]
    # "mycatx" is another word
    assert seen["afterLookalike"]["negative"] == "", seen["afterLookalike"]


def test_with_auto_negative_off_a_hint_offers_the_partner(seen):
    assert seen["negativeBeforeHint"] == ""
    assert f"{PLAIN_CONCEPT}-neg" in seen["hintText"], seen["hintText"]
    assert seen["afterHint"]["negative"] == f"{PLAIN_CONCEPT}-neg", seen["afterHint"]


def test_the_concept_card_gives_name_and_partner(seen):
    assert seen["afterConceptCard"] == {"prompt": CONCEPT, "negative": f"{CONCEPT}-neg"}
    assert seen["afterSecondClick"] == {"prompt": "", "negative": ""}  # the host's toggle takes both back


def test_partners_and_adapters_have_no_card_and_other_cards_are_the_hosts(seen):
    cards = seen["textualInversionCards"]
    assert {CONCEPT, PLAIN_CONCEPT, PLAIN_EMBEDDING} <= set(cards), cards
    assert f"{CONCEPT}-neg" not in cards and f"{PLAIN_CONCEPT}-neg" not in cards, cards
    assert seen["afterPlainEmbeddingCard"] == {"prompt": PLAIN_EMBEDDING, "negative": ""}
    assert CONCEPT not in seen["loraCards"] and f"{CONCEPT}-neg" not in seen["loraCards"], seen["loraCards"]


def test_no_script_error_in_the_page_or_the_log(seen):
    assert seen["pageErrors"] == [], seen["pageErrors"]
    assert tracebacks(seen["log"]) == [], seen["log"][-4000:]

"""The "DreamArtist batch" script through the real host's API: one response with every concept x prompt x guidance
image and its infotext; bad arguments give an error response and leave the host working."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from webui_host import mentions_us, tracebacks

sys.path.insert(0, str(Path(__file__).resolve().parent / "probe"))
from concept_files import adapter_shapes, write_concept  # noqa: E402

pytestmark = pytest.mark.integration

TITLE = "DreamArtist batch"
BASE = {"steps": 2, "width": 64, "height": 64, "seed": 77, "sampler_name": "Euler", "negative_prompt": "blurry",
        "cfg_scale": 5.0}


LOG_START: dict[str, int] = {}  # where this module's part of the (session-shared) host log begins


@pytest.fixture(scope="module")
def learned(webui, host_setup):
    LOG_START["offset"] = len(webui.log())
    shapes = adapter_shapes(host_setup.checkpoint_dir / "tiny.safetensors", host_setup.checkpoint_dir / "tiny.yaml")
    write_concept(webui.data_dir, "batchcat", shapes, seed=11)
    write_concept(webui.data_dir, "batchdog", None, seed=12)
    assert webui.post("/sdapi/v1/refresh-embeddings")[0] == 200
    return webui


def _pixels(b64_png: str) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(b64_png))).convert("RGB").tobytes()


def _batch(host, concepts, prompts, guidance, **request):
    return host.post("/sdapi/v1/txt2img", {**BASE, **request, "script_name": TITLE,
                                           "script_args": [concepts, prompts, guidance]})


def test_every_concept_prompt_and_guidance(learned):
    status, body = _batch(learned, ["batchcat", "batchdog"], "a photo of [name]\n[name] on grass", "3, 7")
    assert status == 200, body
    info = json.loads(body["info"])
    assert len(body["images"]) == len(info["infotexts"]) == 2 * 2 * 2
    cells = [(c, p, g) for c in ("batchcat", "batchdog") for p in ("a photo of {}", "{} on grass") for g in (3.0, 7.0)]
    for infotext, (concept, prompt, guidance) in zip(info["infotexts"], cells):
        first, negative, params = infotext.split("\n")
        assert first == prompt.format(concept)
        assert negative == f"Negative prompt: blurry, {concept}-neg"
        assert f"CFG scale: {guidance}" in params and "Seed: 77" in params
        assert f"{concept}-neg:" in params  # TI hashes: the host injected both words
        assert ('DreamArtist: "batchcat:1.0"' in params) == (concept == "batchcat"), params
    assert len({_pixels(image) for image in body["images"]}) == 8

    # a cell equals the same generation through the always-on prompt script (adapters routed the same way) ...
    single = {**BASE, "prompt": "a photo of batchcat", "negative_prompt": "blurry, batchcat-neg", "cfg_scale": 3.0}
    status, same = learned.post("/sdapi/v1/txt2img", single)
    assert status == 200, same
    assert _pixels(same["images"][0]) == _pixels(body["images"][0])
    # ... and differs from it without the adapters
    status, plain = learned.post("/sdapi/v1/txt2img", {**single, "alwayson_scripts": {
        "DreamArtist": {"args": [False, 1.0, True]}}})
    assert status == 200, plain
    assert _pixels(plain["images"][0]) != _pixels(body["images"][0])


def test_defaults_cover_every_learned_concept(learned):
    status, listed = learned.get("/dreamartist/prompt-words")
    assert status == 200
    names = [c["name"] for c in listed["concepts"]]
    assert {"batchcat", "batchdog"} <= set(names)
    status, body = _batch(learned, "", "", "", batch_size=2)
    assert status == 200, body
    info = json.loads(body["info"])
    assert len(body["images"]) == 2 * len(names)
    assert [text.split("\n")[0] for text in info["infotexts"]] == [n for n in names for _ in range(2)]


@pytest.mark.parametrize("args, message", [
    (["nosuchconcept", "[name]", ""], "unknown concept(s) nosuchconcept"),
    (["batchcat", "a photo of a cat", ""], "no [name] placeholder"),
    (["batchcat", "[name]", "3, strong"], "guidance value 'strong' is not a number"),
    (["batchcat", "[name]", "-2"], "must be a positive number"),
    ([{"name": "batchcat"}, "[name]", ""], "concepts must be text or a list"),
])
def test_bad_arguments_are_a_clear_error(learned, args, message):
    status, body = _batch(learned, *args)
    assert status == 422, body
    assert message in body["detail"], body
    status, body = learned.post("/sdapi/v1/txt2img", {**BASE, "prompt": "still working"})
    assert status == 200, body


def test_no_traceback_of_ours(learned):
    log = learned.log()[LOG_START["offset"]:]
    ours = [block for block in tracebacks(log) if mentions_us(block)]
    assert ours == []
    assert "DreamArtist:" not in log  # no warning of ours while the batch tests ran

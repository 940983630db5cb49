"""Learned words typed into prompts on the real host: per-branch adapters at the real U-Net and text-encoder
calls, in every batching mode the host uses, plus infotext, paste, auto-negative, composition and cleanup.

A dedicated host runs with the test-only probe extension (tests/integration/probe), which re-runs each U-Net /
text-encoder call inside the host with all rows on the positive adapter, all on the negative one and on the
base weights, and records how far the real output is from each - per row, with the row's branch read from its
own conditioning.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from webui_host import mentions_us, png_b64, start_webui, tracebacks

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "probe"))
from concept_files import adapter_shapes, expected_delta, write_concept  # noqa: E402

pytestmark = pytest.mark.integration

BASE = {"steps": 4, "width": 64, "height": 64, "seed": 1234, "sampler_name": "Euler", "cfg_scale": 5.0,
        "negative_prompt": "blurry"}
LONG_PROMPT = "mycat, " + ", ".join(f"word{i}" for i in range(60))  # > 75 tokens: 2 chunks
DA = "DreamArtist"
U_PREFIX = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
T_PREFIX = "lora_te_text_model_encoder_layers_3_self_attn_v_proj"
SUMMARY: dict[str, str] = {}  # mode -> numbers, printed at the end (pytest -s)


@pytest.fixture(scope="module")
def host(host_setup, tmp_path_factory):
    data = tmp_path_factory.mktemp("prompts-host")
    (data / "extensions").mkdir()
    (data / "extensions" / "dreamartist-probe").symlink_to(HERE / "probe", target_is_directory=True)
    shapes = adapter_shapes(host_setup.checkpoint_dir / "tiny.safetensors", host_setup.checkpoint_dir / "tiny.yaml")
    concepts = {"mycat": write_concept(data, "mycat", shapes, seed=1),
                "plainpair": write_concept(data, "plainpair", None, seed=2)}
    webui = start_webui(host_setup, data)
    webui.shapes = shapes
    webui.concepts = concepts
    webui.plain_before = _plain_png(webui)
    yield webui
    webui.stop()


def _pixels(b64_png: str) -> bytes:
    """The image's pixels (the PNG also holds the infotext, which differs where the pixels must not)."""
    return Image.open(io.BytesIO(base64.b64decode(b64_png))).convert("RGB").tobytes()


def _txt2img(host, endpoint="txt2img", **request):
    status, body = host.post(f"/sdapi/v1/{endpoint}", {**BASE, **request})
    assert status == 200, body
    info = json.loads(body["info"])
    return _pixels(body["images"][0]), info


def _plain_png(host) -> str:
    status, body = host.post("/sdapi/v1/txt2img", {**BASE, "prompt": "a red cube"})
    assert status == 200, body
    assert "DreamArtist" not in body["info"]
    return body["images"][0]


def _args(enabled=True, weight=1.0, auto_negative=True):
    return {"alwayson_scripts": {DA: {"args": [enabled, weight, auto_negative]}}}


def _probed(host, endpoint="txt2img", delta_prefixes=(), **request):
    request.setdefault("steps", 2)  # every re-run costs three more calls; two steps show every layout
    status, _ = host.post("/probe/start", {"delta_prefixes": list(delta_prefixes)})
    assert status == 200
    try:
        image, info = _txt2img(host, endpoint, **request)
    finally:
        status, record = host.post("/probe/stop")
    assert status == 200
    return image, info, record


def _check_routing(record, mode: str) -> dict:
    """Every row of every call: nearest to the re-run on its own branch's adapter, far from the other branch and
    from the base weights. Returns the numbers."""
    assert record["unet"], "no U-Net call was recorded"
    worst_same, closest_other, closest_base = 0.0, float("inf"), float("inf")
    for call in record["unet"]:
        assert call["routed"], call
        for role, row in zip(call["roles"], call["rows_detail"]):
            assert role in ("cond", "uncond"), call["roles"]
            same, other = ("d_pos", "d_neg") if role == "cond" else ("d_neg", "d_pos")
            worst_same = max(worst_same, row[same] / row["scale"])
            closest_other = min(closest_other, row[other] / row["scale"])
            closest_base = min(closest_base, row["d_base"] / row["scale"])
    text_same, text_other = 0.0, float("inf")
    for call in record["text"]:
        assert call["routed"], call
        for row in call["rows_detail"]:
            same, other = ("d_neg", "d_pos") if call["negative"] else ("d_pos", "d_neg")
            text_same = max(text_same, row[same] / row["scale"])
            text_other = min(text_other, row[other] / row["scale"])
    numbers = {"unet_calls": len(record["unet"]), "rows": [c["rows"] for c in record["unet"]][:6],
               "unet_same": worst_same, "unet_other": closest_other, "unet_base": closest_base,
               "text_calls": len(record["text"]), "text_same": text_same, "text_other": text_other}
    SUMMARY[mode] = line = (f"{numbers['unet_calls']} U-Net calls (rows {numbers['rows']}...): own branch rel.diff "
                     f"<= {worst_same:.1e}, other branch >= {closest_other:.1e}, base >= {closest_base:.1e}; "
                     f"{numbers['text_calls']} text calls: own <= {text_same:.1e}, other >= {text_other:.1e}")
    print(f"\n{mode}: {line}")
    # float noise of a re-run with another batch composition vs. a real adapter difference
    assert worst_same < 1e-5 and closest_other > 1e-3 and closest_base > 1e-3, numbers
    if record["text"]:
        assert text_same < 1e-5 and text_other > 1e-3, numbers
    return numbers


def test_learned_word_and_partner_are_injected_and_recorded(host):
    _, info = _txt2img(host, prompt="a photo of mycat")
    text = info["infotexts"][0]
    ti_hashes = info["extra_generation_params"]["TI hashes"]
    assert "mycat:" in ti_hashes and "mycat-neg:" in ti_hashes, ti_hashes
    assert info["all_negative_prompts"][0] == "blurry, mycat-neg"
    assert f'{DA}: "mycat:1.0"' in text and f"{DA} auto-negative: mycat-neg" in text, text


ROUTING_MODES = {
    # mode: (options to set, request)
    "batched": ({}, {"prompt": "a photo of mycat", "batch_size": 2}),
    "chunked": ({"batch_cond_uncond": False}, {"prompt": "a photo of mycat", "batch_size": 2}),
    "chunked-mixed-roles": ({"batch_cond_uncond": False}, {
        "prompt": "x", "batch_size": 2,
        "alwayson_scripts": {"dreamartist probe": {"args": [json.dumps(["mycat AND a dog:0.5", "mycat"])]}}}),
    "separate-long-prompt": ({}, {"prompt": LONG_PROMPT}),
    "skipped-uncond": ({}, {"prompt": "a photo of mycat", "s_min_uncond": 100.0}),  # odd steps skip uncond
    "hires-fix": ({}, {"prompt": "a photo of mycat", "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent",
                       "denoising_strength": 0.6, "hr_second_pass_steps": 2}),
    "img2img": ({}, {"prompt": "a photo of mycat", "init_images": [png_b64((64, 64))], "denoising_strength": 0.6}),
}


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
def test_each_row_gets_the_adapter_of_its_branch(host, mode):
    options, request = ROUTING_MODES[mode]
    endpoint = "img2img" if mode == "img2img" else "txt2img"
    if options:
        assert host.post("/sdapi/v1/options", options)[0] == 200
    try:
        _, _, record = _probed(host, endpoint, **request)
    finally:
        if options:  # override_settings would leak (the host restores only options already in its config)
            assert host.post("/sdapi/v1/options", {"batch_cond_uncond": True})[0] == 200
    _check_routing(record, mode)
    calls = record["unet"]
    roles = [call["roles"] for call in calls]
    if mode == "batched":
        assert all(r == ["cond", "cond", "uncond", "uncond"] for r in roles), roles
    elif mode == "chunked":
        assert all(r in (["cond", "cond"], ["uncond", "uncond"]) for r in roles), roles
    elif mode == "chunked-mixed-roles":  # 3 cond rows (2 + 1 sub-prompts), 2 uncond rows, chunks of 2
        assert roles[:3] == [["cond", "cond"], ["cond", "uncond"], ["uncond"]], roles
    elif mode == "separate-long-prompt":
        assert [c["roles"] for c in calls[:2]] == [["cond"], ["uncond"]], roles
        assert calls[0]["context_tokens"] > 77 and calls[1]["context_tokens"] == 77
    elif mode == "skipped-uncond":
        assert ["cond"] in roles and ["cond", "uncond"] in roles, roles
    elif mode == "hires-fix":
        assert {c["latent_size"] for c in calls} == {8, 16}  # first pass, then the second pass at twice the size
    assert {call["negative"] for call in record["text"]} == {True, False}  # both prompts encoded, each routed


@pytest.mark.parametrize("name", ["猫の絵", "black cat"])
def test_names_in_any_script_and_with_spaces_are_injected_and_routed(host, name):
    """The host takes any file stem as an embedding name and matches it by tokens: a concept named in Japanese or
    with an inner space is injected into both prompts and its adapters are routed like any other."""
    if name not in host.concepts:
        host.concepts[name] = write_concept(host.data_dir, name, host.shapes, seed=4)
        assert host.post("/sdapi/v1/refresh-embeddings")[0] == 200
    _, info, record = _probed(host, prompt=f"a photo of {name}, detailed")
    ti_hashes = info["extra_generation_params"]["TI hashes"]
    assert f"{name}:" in ti_hashes and f"{name}-neg:" in ti_hashes, ti_hashes
    assert info["all_negative_prompts"][0] == f"blurry, {name}-neg"
    assert info["extra_generation_params"][DA] == f"{name}:1.0"
    _check_routing(record, f"name {name!r}")


def test_concept_without_adapters_only_injects_embeddings(host):
    _, info, record = _probed(host, prompt="a photo of plainpair")
    assert not any(call["routed"] for call in record["unet"])
    assert "plainpair-neg" in info["extra_generation_params"]["TI hashes"]
    assert info["all_negative_prompts"][0] == "blurry, plainpair-neg"
    assert DA not in info["extra_generation_params"]


def test_weight_zero_and_disabled_equal_no_adapters(host):
    request = {"prompt": "a photo of mycat", "negative_prompt": "blurry, mycat-neg"}
    disabled, _ = _txt2img(host, **request, **_args(enabled=False))
    weight_zero, info = _txt2img(host, **request, **_args(weight=0.0))
    applied, _ = _txt2img(host, **request)
    assert disabled == weight_zero
    assert applied != disabled
    assert info["extra_generation_params"][DA] == "mycat:0.0"


def test_auto_negative_off_leaves_the_negative_prompt(host):
    _, info = _txt2img(host, prompt="a photo of mycat", **_args(auto_negative=False))
    assert info["all_negative_prompts"][0] == "blurry"
    assert info["extra_generation_params"][f"{DA} auto-negative"] == "off"
    _, info = _txt2img(host, prompt="a photo of mycat", negative_prompt="(MYCAT-neg:1.1), blurry")
    assert info["all_negative_prompts"][0] == "(MYCAT-neg:1.1), blurry"  # already there: nothing added
    assert f"{DA} auto-negative" not in info["extra_generation_params"]


def test_infotext_paste_restores_the_generation(host):
    image, info = _txt2img(host, prompt="a photo of mycat", **_args(weight=0.7))
    infotext = info["infotexts"][0]
    assert f'{DA}: "mycat:0.7"' in infotext
    status, body = host.post("/sdapi/v1/txt2img", {"infotext": infotext})  # default weight 1.0 unless pasted
    assert status == 200, body
    assert _pixels(body["images"][0]) == image
    pasted = json.loads(body["info"])
    assert pasted["all_negative_prompts"][0] == "blurry, mycat-neg"  # not added twice
    assert pasted["extra_generation_params"][DA] == "mycat:0.7"


def test_several_concepts_compose(host):
    zebra = write_concept(host.data_dir, "zebrastyle", host.shapes, seed=3)
    assert host.post("/sdapi/v1/refresh-embeddings")[0] == 200
    _, info, record = _probed(host, prompt="mycat in zebrastyle", delta_prefixes=[U_PREFIX, T_PREFIX], steps=2)
    assert info["extra_generation_params"][DA] == "mycat:1.0, zebrastyle:1.0"
    assert info["all_negative_prompts"][0] == "blurry, mycat-neg, zebrastyle-neg"
    _check_routing(record, "two-concepts")
    for branch in ("pos", "neg"):
        for prefix in (U_PREFIX, T_PREFIX):
            attached = record["deltas"][f"{branch}:{prefix}"]
            expected = expected_delta([(host.concepts["mycat"], 1.0), (zebra, 1.0)], branch, prefix)
            assert attached["rank"] == 8
            assert attached["norm"] == pytest.approx(float(expected.norm()), rel=1e-5)
            assert torch.allclose(torch.tensor(attached["corner"]), expected[:4, :4].flatten(), atol=1e-6)


def test_a_failed_generation_leaves_nothing_attached(host):
    status, hooks_before = host.get("/probe/model")
    assert status == 200 and hooks_before["lora_layers"] == 0
    # fails in p.init(), after the script attached the adapters: no postprocess, only the API's p.close()
    status, body = host.post("/sdapi/v1/txt2img", {**BASE, "prompt": "a photo of mycat", "enable_hr": True,
                                                   "hr_upscaler": "no such upscaler"})
    assert status == 500 and "no such upscaler" in body["errors"], body
    status, state = host.get("/probe/model")
    assert state == hooks_before


def test_host_is_unchanged_afterwards(host):
    status, words = host.get("/dreamartist/prompt-words")
    assert status == 200
    listed = {c["name"]: (c["negative"], c["adapters"]) for c in words["concepts"]}
    assert listed.items() >= {"mycat": ("mycat-neg", True), "plainpair": ("plainpair-neg", False)}.items()
    assert _plain_png(host) == host.plain_before  # the same PNG, byte for byte (pixels and infotext)
    status, state = host.get("/probe/model")
    assert state["lora_layers"] == 0 and not state["adapters_active"], state
    log = host.log()
    assert [block for block in tracebacks(log) if mentions_us(block)] == [], log
    assert "DreamArtist:" not in log, log
    for mode, line in SUMMARY.items():
        print(f"{mode}: {line}")

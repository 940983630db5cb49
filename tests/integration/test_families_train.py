"""SDXL and SD 2.x-v on the real host: a pair with adapters trained through the API on the loaded model, written
where the host loads it (SDXL: one file per word holding clip_l and clip_g), injected into both prompts and its
adapters routed per CFG branch at generation, every LoRA key matched by the host's own Lora loader, the model
restored; a pair of one family is refused on another. One host per family (tiny random checkpoints built with
the host's own classes: see build_tiny_family.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from test_api import API, ended, txt2img, wait_for_job
from webui_host import HERE, png_b64, start_family_webui, tracebacks

sys.path.insert(0, str(HERE / "probe"))

FAMILIES = {"sdxl": {"shape": 2048, "keys": {"clip_l": 768, "clip_g": 1280}, "native": 1024},
            "sd2v": {"shape": 1024, "keys": {"emb_params": 1024}, "native": 768}}
ARCHITECTURE = {"sdxl": "sdxl", "sd2v": "sd2"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_host(request, host_setup, tmp_path_factory):
    family = request.param
    data = tmp_path_factory.mktemp(f"webui-{family}")
    (data / "extensions").mkdir(parents=True)
    (data / "extensions" / "dreamartist-probe").symlink_to(HERE / "probe", target_is_directory=True)
    host = start_family_webui(host_setup, data, family)
    yield family, host
    host.stop()


def _options(**overrides) -> dict:
    options = {"width": 64, "height": 64, "steps": 3, "save_every": 0, "preview_every": 3,
               "preview": {"prompt": "a photo of [name]", "steps": 2}, "unet_rank": 2, "text_rank": 2,
               "reconstruction_weight": 1.0}
    options.update(overrides)
    return options


def _probed_txt2img(host, prompt: str, negative: str = "") -> tuple[dict, dict]:
    assert host.post("/probe/start", {})[0] == 200
    try:
        status, body = host.post("/sdapi/v1/txt2img", {
            "prompt": prompt, "negative_prompt": negative, "steps": 2, "width": 64, "height": 64, "seed": 3,
            "sampler_name": "Euler", "scheduler": "Automatic"})
    finally:
        record = host.post("/probe/stop")[1]
    assert status == 200, body
    return json.loads(body["info"]), record


def test_a_pair_with_adapters_trains_on_the_loaded_model_and_is_used(family_host):
    family, host = family_host
    name = f"da{family}"
    before, _ = txt2img(host, f"a photo of {name}")
    upload = {"data": png_b64((64, 64), seed=5), "filename": "cube.png", "caption": "a red cube"}
    status, accepted = host.post(f"{API}/train", {"name": name, "images": [upload], "options": _options()})
    assert status == 202, accepted
    job = wait_for_job(host, accepted["job_id"], ended, timeout=900)
    assert job["state"] == "finished" and job["error"] is None, job
    assert job["model_restored"] is True and job["step"] == 3 and job["previews"], job

    # files where the host loads them, in the family's layout, saying which family they are for
    embedding = host.data_dir / "embeddings" / f"{name}.safetensors"
    with safe_open(str(embedding), framework="pt") as handle:
        assert {key: handle.get_slice(key).get_shape() for key in handle.keys()} == {
            key: [3, width] for key, width in FAMILIES[family]["keys"].items()}
        assert json.loads(handle.metadata()["architecture"]) == ARCHITECTURE[family]
    loaded = host.get("/sdapi/v1/embeddings")[1]["loaded"]
    for word in (name, f"{name}-neg"):
        assert loaded[word]["shape"] == FAMILIES[family]["shape"] and loaded[word]["vectors"] == 3, loaded

    # the host's own Lora loader finds a module for every layer of both adapters
    for word in (name, f"{name}-neg"):
        status, match = host.post("/probe/lora-keys", {"name": word})
        assert status == 200 and match["matched"] == match["file_layers"] > 0, match

    # generation: name-neg joins the negative prompt, the adapters act, each branch through its own adapter
    info, record = _probed_txt2img(host, f"a photo of {name}")
    infotext = info["infotexts"][0]
    assert f"{name}-neg" in info["negative_prompt"] and "DreamArtist" in infotext, infotext
    after, _ = txt2img(host, f"a photo of {name}")
    assert after != before
    routed = [call for call in record["unet"] if call["routed"]]
    assert routed, record["unet"]
    for call in routed:
        for role, row in zip(call["roles"], call["rows_detail"]):
            own = "d_pos" if role == "cond" else "d_neg"
            other = "d_neg" if role == "cond" else "d_pos"
            assert role in ("cond", "uncond") and row[own] <= 1e-4 * max(row["scale"], 1.0), (role, row)
            assert row[other] > row[own] or row["pos_vs_neg"] == 0, (role, row)
    texts = [call for call in record["text"] if call["routed"]]
    assert {call["negative"] for call in texts} == {True, False}, texts
    for call in texts:
        own = "d_neg" if call["negative"] else "d_pos"
        assert all(row[own] <= 1e-4 * max(row["scale"], 1.0) for row in call["rows_detail"]), call
    assert not [t for t in tracebacks(host.log()) if "dreamartist" in t.lower()]


def test_a_pair_of_another_family_is_refused_with_a_sentence(family_host, tmp_path):
    """Continuing a pair written for SD 1.x (768-wide, architecture sd1) on this model is refused before any
    training, with the family named; nothing is written."""
    from dreamartist_ext import files

    family, host = family_host
    name = f"sd1for{family}"
    embeddings = host.data_dir / "embeddings"
    for word in (name, f"{name}-neg"):
        files.save_embedding(embeddings / f"{word}.safetensors", torch.randn(3, 768) * 0.01,
                             {"architecture": "sd1", "step": 5, "adapters": False})
    status, body = host.post(f"{API}/train", {"name": name, "images": [{"data": png_b64((64, 64)),
                                                                       "filename": "x.png"}],
                                              "options": _options(), "continue_existing": True})
    assert status == 400, body
    assert "was trained on an SD 1.x model and cannot be used with the loaded" in json.dumps(body), body
    assert not (host.data_dir / "models" / "Lora" / "dreamartist" / f"{name}.safetensors").exists()

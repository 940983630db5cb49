"""SDXL and SD 2.x-v on the real host (tiny checkpoints built with the host's own classes: build_tiny_families.py;
one host start per family, module-scoped, parametrised): the host loads and generates; a pair with adapters trains
through the API on the loaded model and is written where the host loads it (SDXL: one file per word holding
clip_l and clip_g); the host's own Lora loader matches every key; at generation the pair is injected into both
prompts and each CFG branch runs through its own adapter; a pair of another family is refused with a sentence."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from test_api import API, ended, wait_for_job
from browser_driver import MISSING, OUTPUT_DIR, run_driver
from test_batch_script import TITLE as BATCH_TITLE
from webui_host import HERE, png_b64, prepare_families, start_webui, tracebacks

FAMILIES = {
    "tiny-sdxl": dict(size=128, is_sdxl=True, architecture="sdxl", shape=2048, keys={"clip_l": 768, "clip_g": 1280},
                      native=1024),
    "tiny-sd2v": dict(size=64, is_sdxl=False, architecture="sd2", shape=1024, keys={"emb_params": 1024},
                      native=768),
}


@pytest.fixture(scope="module")
def families_setup(host_setup):
    return prepare_families(host_setup)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_host(request, families_setup, tmp_path_factory):
    name = request.param
    data = tmp_path_factory.mktemp(name)
    (data / "extensions").mkdir(parents=True)
    (data / "extensions" / "dreamartist-probe").symlink_to(HERE / "probe", target_is_directory=True)
    host = start_webui(families_setup, data, checkpoint=name, options={"live_previews_enable": False})
    host.family = name
    yield host
    host.stop()


def txt2img(host, **kw):
    size = FAMILIES[host.family]["size"]
    body = {"prompt": "a cube", "negative_prompt": "", "steps": 2, "width": size, "height": size, "seed": 1,
            "sampler_name": "Euler", **kw}
    status, answer = host.post("/sdapi/v1/txt2img", body)
    assert status == 200, answer
    return answer


def probed_txt2img(host, **kw):
    assert host.post("/probe/start", {})[0] == 200
    try:
        answer = txt2img(host, **kw)
    finally:
        record = host.post("/probe/stop")[1]
    return answer, record


def test_the_host_loads_the_family_and_generates(family_host):
    status, options = family_host.get("/sdapi/v1/options")
    assert status == 200
    assert options["sd_model_checkpoint"].startswith(family_host.family), options["sd_model_checkpoint"]
    answer = txt2img(family_host)
    assert len(answer["images"]) == 1
    assert tracebacks(family_host.log()) == [], family_host.log()


def test_a_pair_with_adapters_trains_on_the_loaded_model_and_is_used(family_host):
    host, facts = family_host, FAMILIES[family_host.family]
    name = "da" + facts["architecture"]
    size = facts["size"]
    before = txt2img(host, prompt=f"a photo of {name}")["images"][0]
    upload = {"data": png_b64((size, size), seed=5), "filename": "cube.png", "caption": "a red cube"}
    options = {"width": size, "height": size, "steps": 3, "save_every": 0, "preview_every": 3,
               "preview": {"prompt": "a photo of [name]", "steps": 2}, "unet_rank": 2, "text_rank": 2,
               "reconstruction_weight": 1.0}
    status, accepted = host.post(f"{API}/train", {"name": name, "images": [upload], "options": options})
    assert status == 202, accepted
    job = wait_for_job(host, accepted["job_id"], ended, timeout=900)
    assert job["state"] == "finished" and job["error"] is None, job
    assert job["model_restored"] is True and job["step"] == 3 and job["previews"], job

    # files where the host loads them, in the family's layout, saying which family they are for
    with safe_open(str(host.data_dir / "embeddings" / f"{name}.safetensors"), framework="pt") as handle:
        assert {key: handle.get_slice(key).get_shape() for key in handle.keys()} == {
            key: [3, width] for key, width in facts["keys"].items()}
        assert handle.metadata()["architecture"] == facts["architecture"]
    loaded = host.get("/sdapi/v1/embeddings")[1]["loaded"]
    for word in (name, f"{name}-neg"):
        assert loaded[word]["shape"] == facts["shape"] and loaded[word]["vectors"] == 3, loaded

    # the host's own Lora loader finds a module for every layer of both adapters
    for word in (name, f"{name}-neg"):
        status, match = host.post("/probe/lora-keys", {"name": word})
        assert status == 200 and match["matched"] == match["file_layers"] > 0, match

    # generation: name-neg joins the negative prompt, the adapters act, each branch through its own adapter
    answer, record = probed_txt2img(host, prompt=f"a photo of {name}")
    info = json.loads(answer["info"])
    assert f"{name}-neg" in info["negative_prompt"] and "DreamArtist" in info["infotexts"][0], info
    assert answer["images"][0] != before
    routed = [call for call in record["unet"] if call["routed"]]
    assert routed, record["unet"]
    # each row equals the rerun with its own branch's adapter up to float rounding and differs from the other's
    # (three steps of training leave the adapters small: the branches differ by ~4e-5 here; batched vs single-row
    # kernels round differently by up to ~4e-7 on some CPUs, so "equal" is 1e-6 and 20x below the other branch)
    for call in routed:
        assert set(call["roles"]) == {"cond", "uncond"}, call["roles"]
        for role, row in zip(call["roles"], call["rows_detail"]):
            own, other = ("d_pos", "d_neg") if role == "cond" else ("d_neg", "d_pos")
            assert row[own] <= 1e-6 * max(row["scale"], 1.0) and row["pos_vs_neg"] > 0, (role, row)
            assert row[other] > 20 * row[own], (role, row)
    texts = [call for call in record["text"] if call["routed"]]
    assert {call["negative"] for call in texts} == {True, False}, texts
    for call in texts:
        own, other = ("d_neg", "d_pos") if call["negative"] else ("d_pos", "d_neg")
        assert all(row[own] <= 1e-7 * max(row["scale"], 1.0) < row[other] for row in call["rows_detail"]), call
    assert tracebacks(host.log()) == [], host.log()[-3000:]


def test_a_pair_of_another_family_is_refused_with_a_sentence(family_host):
    """Continuing a pair written for SD 1.x (768 wide, architecture sd1) on this model is refused before any
    training, naming both families; nothing is written."""
    from dreamartist_ext import files

    host = family_host
    name = "sd1pair"
    for word in (name, f"{name}-neg"):
        files.save_embedding(host.data_dir / "embeddings" / f"{word}.safetensors", torch.randn(3, 768) * 0.01,
                             {"architecture": "sd1", "step": 5, "adapters": False})
    size = FAMILIES[host.family]["size"]
    status, body = host.post(f"{API}/train", {"name": name, "images": [{"data": png_b64((size, size)),
                                                                       "filename": "x.png"}],
                                              "options": {"width": size, "height": size, "steps": 2}})
    assert status == 400, body
    assert "was trained on an SD 1.x model and cannot be used with the loaded" in json.dumps(body), body
    assert not list((host.data_dir / "dreamartist").glob(f"{name}/log/checkpoints/*"))


def test_the_batch_script_renders_the_trained_concept(family_host):
    """The "DreamArtist batch" script on this family: every prompt x guidance image of the pair trained above."""
    host = family_host
    name = "da" + FAMILIES[host.family]["architecture"]
    status, body = host.post("/sdapi/v1/txt2img", {
        "prompt": "", "steps": 2, "width": FAMILIES[host.family]["size"], "height": FAMILIES[host.family]["size"],
        "seed": 5, "sampler_name": "Euler", "script_name": BATCH_TITLE,
        "script_args": [[name], "a photo of [name]", "3, 7"]})
    assert status == 200, body
    infotexts = json.loads(body["info"])["infotexts"]
    assert len(body["images"]) >= 2 and all(f"{name}-neg" in text for text in infotexts[-2:]), infotexts
    assert tracebacks(host.log()) == [], host.log()[-3000:]


@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_train_in_the_tab(family_host, tmp_path):
    """Train > DreamArtist on this family in a real browser: the tab trains a pair with adapters and previews."""
    from support import write_image

    host = family_host
    family = FAMILIES[host.family]
    name = "datab" + family["architecture"]
    seen = run_driver("drive_tab.js", {
        "url": host.url, "image": str(write_image(tmp_path / "reference.png", size=(96, 96), seed=3)),
        "name": name, "userDataDir": str(tmp_path / "chromium-profile"), "steps": 2, "size": family["size"],
        "previewEvery": 2, "timeoutMs": 600_000, "onlyTrain": True, "shotPrefix": f"dreamartist-{host.family}",
    })
    assert seen["status"].startswith("Finished") and "step 2/2" in seen["status"], seen["status"]
    assert seen["galleryImages"] == 1 and seen["lossPlotShown"], seen
    for word in (name, f"{name}-neg"):
        assert str(host.data_dir / "embeddings" / f"{word}.safetensors") in seen["files"], seen["files"]
        assert (host.data_dir / "models" / "Lora" / "dreamartist" / f"{word}.safetensors").is_file()
    assert seen["pageErrors"] == [], seen["pageErrors"]
    assert (OUTPUT_DIR / f"dreamartist-{host.family}-after.png").stat().st_size > 10_000
    assert tracebacks(host.log()) == [], host.log()[-3000:]


# -- the Train tab's defaults: its handler driven through gradio's HTTP API (what the button sends, no browser) ---


def _gradio_call(host, elem_id: str, values: dict[str, object]) -> list:
    """Call the event of the button ``elem_id`` with every input at the value the page opens with, except
    ``values`` (by elem_id); returns the event's outputs. Also returns the opening values it used."""
    status, config = host.get("/config")
    assert status == 200, config
    components = {c["id"]: c for c in config["components"]}
    button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)

    def targets(dependency):
        return [t[0] if isinstance(t, (list, tuple)) else t for t in dependency.get("targets", [])]

    index, dependency = next((i, d) for i, d in enumerate(config["dependencies"]) if button in targets(d)
                             and d.get("trigger", "click") == "click")
    data, opening = [], {}
    for input_id in dependency["inputs"]:
        props = components[input_id].get("props", {})
        key = props.get("elem_id")
        opening[key] = props.get("value")
        data.append(values.get(key, props.get("value")))
    status, answer = host.post("/run/predict", {"fn_index": index, "data": data, "session_hash": "dreamartist"})
    assert status == 200, answer
    return answer["data"], opening


def test_the_train_tab_trains_at_the_models_native_size(family_host, tmp_path):
    """The tab opens with training size 0, which trains at the loaded model's native size (SDXL 1024, SD 2.x-v
    768)."""
    from support import write_image

    family = FAMILIES[family_host.family]
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "cube.png", size=(96, 96), seed=3)
    name = "danative" + family["architecture"]
    outputs, opening = _gradio_call(family_host, "dreamartist_train", {
        "dreamartist_name": name, "dreamartist_folder": str(folder), "dreamartist_steps": 1,
        "dreamartist_preview_every": 0, "dreamartist_save_every": 0, "dreamartist_reconstruction_weight": 0,
        "dreamartist_unet_rank": 1, "dreamartist_text_rank": 1, "dreamartist_preview_steps": 1})
    assert opening["dreamartist_width"] == 0 and opening["dreamartist_height"] == 0, opening
    assert opening["dreamartist_preview_width"] == 0, opening  # preview size 0 = the training size
    status_html = outputs[-1]
    assert "Finished" in status_html and "step 1/1" in status_html, status_html
    with safe_open(str(family_host.data_dir / "embeddings" / f"{name}.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == set(family["keys"])
        assert handle.metadata()["architecture"] == family["architecture"]
    loaded = family_host.get("/sdapi/v1/embeddings")[1]["loaded"]
    assert loaded[name]["shape"] == family["shape"], loaded
    # the run's closing preview is made at the training size: the model's native size
    (preview,) = (family_host.data_dir / "dreamartist" / name / "previews").glob("*.png")
    with Image.open(preview) as image:
        assert image.size == (family["native"], family["native"]), image.size
    assert tracebacks(family_host.log()) == [], family_host.log()[-3000:]

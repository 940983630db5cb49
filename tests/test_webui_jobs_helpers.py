"""The host-independent parts of webui.jobs and webui.uploads: the model fingerprint behind ``model_restored``, the progress line,
JSON-safe statuses, preview settings, name clashes, uploaded images, and the one-job-at-a-time slot.
(Running jobs on the real host is covered by tests/integration/test_api.py.)"""

from __future__ import annotations

import base64
import io
import json
import math

import pytest
import torch
from support import make_image, make_trainer, tree_snapshot

from dreamartist_ext.config import ConfigError, TrainConfig
from dreamartist_ext.data import ImageInputError
from dreamartist_ext.outputs import OutputLayout
from dreamartist_ext.progress import progress_text
from dreamartist_ext.webui.jobs import (
    BusyError,
    JobManager,
    JobStatus,
    fingerprint_difference,
    model_fingerprint,
    name_conflicts,
    preview_settings,
)
from dreamartist_ext.webui.uploads import Upload, stage_uploads


def _fingerprints(binding):
    return [model_fingerprint(root) for root in binding.trainable_roots()]


# -- model fingerprint -------------------------------------------------------------------------------------------


def test_fingerprint_is_unchanged_by_a_whole_training_run(binding, reference_image, tmp_path):
    """Adapters attached and detached, weights frozen and unfrozen, words installed, checkpointing on and off:
    the trainer hands the model back exactly, and the fingerprint sees it that way."""
    before = _fingerprints(binding)
    config = TrainConfig.from_dict(dict(
        name="cube", images=[str(reference_image)], width=32, height=32, steps=2, save_every=0, preview_every=0,
        unet_rank=2, text_rank=2, reconstruction_weight=0.5, gradient_checkpointing=True, template="subject"))
    result = make_trainer(binding, config, OutputLayout.under(tmp_path / "out")).run()
    assert result.status == "finished"
    assert _fingerprints(binding) == before


@pytest.mark.parametrize("change", [
    "edit_in_place", "new_storage", "requires_grad", "grad_left", "module_replaced", "hook_left",
    "forward_patched", "train_mode",
])
def test_fingerprint_sees_every_kind_of_leftover(binding, change):
    root = binding.unet
    before = model_fingerprint(root)
    name, param = next(iter(root.named_parameters()))
    module_name, module = next((n, m) for n, m in root.named_modules() if isinstance(m, torch.nn.Linear))
    if change == "edit_in_place":
        with torch.no_grad():
            param.add_(0.0)  # same values, but written: the version counter moves
    elif change == "new_storage":
        param.data = param.data.clone()
    elif change == "requires_grad":
        param.requires_grad_(not param.requires_grad)
    elif change == "grad_left":
        param.grad = torch.zeros_like(param)
    elif change == "module_replaced":
        parent_name, _, attr = module_name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, attr, torch.nn.Identity())
    elif change == "hook_left":
        module.register_forward_pre_hook(lambda *a: None)
    elif change == "forward_patched":
        module.forward = lambda x: x
    elif change == "train_mode":
        module.train(not module.training)
    after = model_fingerprint(root)
    assert after != before
    differences = fingerprint_difference(before, after)
    expected = name if change in ("edit_in_place", "new_storage", "requires_grad", "grad_left") else module_name
    assert any(d.endswith(" " + expected) for d in differences), differences


# -- progress line and status JSON ------------------------------------------------------------------------------


def test_progress_text_reads_like_the_host_progress_line():
    assert progress_text(120, 3000, {"loss": 0.123449}, 1.93, 1510.2) == \
        "step 120/3000 · loss 0.1234 · 1.9 it/s · ETA 25:10"
    assert progress_text(5, 10, {"loss": 0.5}, 0.25, 3725) == "step 5/10 · loss 0.5000 · 4.0 s/it · ETA 1:02:05"
    assert progress_text(0, 10, {}, 0.0, None) == "step 0/10 · ETA --:--"
    assert "loss not finite" in progress_text(3, 10, {"loss": float("nan")}, 2.0, math.inf)


def test_status_json_has_no_non_finite_numbers():
    status = JobStatus("abc", state="running", values={"loss": float("nan"), "lr": 0.01}, eta_seconds=math.inf,
                       steps_per_second=float("nan"), files=["a"])
    data = status.as_json()
    json.dumps(data, allow_nan=False)
    assert data["values"] == {"loss": None, "lr": 0.01} and data["eta_seconds"] is None
    assert data["steps_per_second"] == 0.0 and data["id"] == "abc" and data["model_restored"] is None
    copy = status.copy()
    copy.files.append("b")
    assert status.files == ["a"]  # a status handed out is a snapshot


# -- previews ----------------------------------------------------------------------------------------------------


def _config(**values) -> TrainConfig:
    return TrainConfig.from_dict({"name": "cube", "width": 64, "height": 96, **values})


def test_preview_settings_from_the_config():
    settings = preview_settings(_config(preview={"prompt": "a photo of [name]", "negative_prompt": "blurry",
                                                 "steps": 4, "guidance": 5, "seed": 3, "count": 2}))
    assert settings.prompt == "a photo of cube" and settings.negative_prompt == "blurry, cube-neg"
    assert (settings.steps, settings.cfg_scale, settings.seed, settings.count) == (4, 5.0, 3, 2)
    assert (settings.width, settings.height) == (64, 96)  # 0 = the training size
    assert settings.sampler_name is None
    already = preview_settings(_config(preview={"negative_prompt": "cube-neg, ugly"}))
    assert already.negative_prompt == "cube-neg, ugly"
    plain_ti = preview_settings(_config(use_negative=False))
    assert plain_ti.negative_prompt == ""


def test_preview_settings_from_txt2img_and_a_sampler():
    txt2img = {"prompt": "[name] on a beach", "negative_prompt": "", "steps": 6.0, "sampler_name": "Euler a",
               "cfg_scale": 6.5, "seed": -1, "width": 128, "height": 64}
    settings = preview_settings(_config(), txt2img, sampler="DDIM")
    assert settings.prompt == "cube on a beach" and settings.negative_prompt == "cube-neg"
    assert (settings.steps, settings.seed, settings.width, settings.height) == (6, -1, 128, 64)
    assert settings.sampler_name == "DDIM"  # the explicit sampler wins
    assert preview_settings(_config(), txt2img).sampler_name == "Euler a"


@pytest.mark.parametrize("txt2img, message", [
    ({"promt": "x"}, "unknown txt2img preview value"),
    ({"steps": "20"}, "preview steps must be a whole number"),
    ({"steps": 0}, "preview steps must be at least 1"),
    ({"width": 100}, "preview width 100 must be a multiple of 8"),
    ({"cfg_scale": "7"}, "CFG scale"),
    ({"prompt": 3}, "preview prompt must be text"),
])
def test_bad_preview_values_are_config_errors(txt2img, message):
    with pytest.raises(ConfigError, match=message):
        preview_settings(_config(), txt2img)


def test_a_preview_option_that_is_not_an_object_is_refused():
    config = _config()
    config.preview = 5
    with pytest.raises(ConfigError, match="'preview' must be an object"):
        preview_settings(config)


# -- names -------------------------------------------------------------------------------------------------------


def test_name_conflicts_ignore_case_but_not_our_own_pair(tmp_path):
    ours = [tmp_path / "cube.safetensors", tmp_path / "cube-neg.safetensors"]
    existing = {"cube": ours[0], "cube-neg": ours[1], "Cube": tmp_path / "other" / "Cube.pt",
                "CUBE-NEG": tmp_path / "x.pt", "cubes": tmp_path / "cubes.pt"}
    assert name_conflicts("cube", existing, ours) == ["Cube", "CUBE-NEG"]
    # the same name in another file is someone else's embedding
    assert name_conflicts("cube", {"cube": tmp_path / "cube.pt"}, ours) == ["cube"]
    assert name_conflicts("sphere", existing, ours) == []


# -- uploads -----------------------------------------------------------------------------------------------------


def _png_bytes(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    make_image(size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploads_are_decoded_named_safely_and_captioned(tmp_path):
    png = _png_bytes()
    encoded = base64.b64encode(png).decode()
    uploads = [Upload(encoded, "../../evil name.png", "a red cube"),
               Upload("data:image/png;base64," + encoded, "evil_name.png"),
               Upload(encoded, None),
               Upload(png, "photo.txt")]
    paths = stage_uploads(uploads, tmp_path / "up")
    assert [p.name for p in paths] == ["evil_name.png", "evil_name-2.png", "image-2.png", "photo.png"]
    assert all(p.parent == tmp_path / "up" and p.read_bytes() == png for p in paths)
    assert (tmp_path / "up" / "evil_name.txt").read_text() == "a red cube"


@pytest.mark.parametrize("data, reason", [
    ("not base64 at all!", "is not valid base64"),
    (base64.b64encode(b"hello, not an image").decode(), "is not an image"),
    ("", "is empty"),
])
def test_a_bad_upload_writes_nothing_and_names_the_item(tmp_path, data, reason):
    good = base64.b64encode(_png_bytes()).decode()
    with pytest.raises(ImageInputError) as caught:
        stage_uploads([Upload(good, "ok.png"), Upload(data, "bad.png")], tmp_path / "up")
    assert "images[1] (bad.png)" in str(caught.value) and reason in str(caught.value)
    assert "images[0]" not in str(caught.value)
    assert tree_snapshot(tmp_path) == {}


# -- the job slot ------------------------------------------------------------------------------------------------


def test_one_thing_at_a_time_and_unknown_jobs():
    manager = JobManager()
    manager.ensure_idle()
    with manager.exclusive("creating 'cube'"):
        with pytest.raises(BusyError, match="busy creating 'cube'"):
            manager.ensure_idle()
        with pytest.raises(BusyError):
            with manager.exclusive("something else"):
                pass
    manager.ensure_idle()
    assert manager.status() is None and manager.status("nope") is None and manager.recent() == []
    assert manager.cancel("nope") is False and manager.cancel() is False

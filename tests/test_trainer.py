"""The training loop end to end on the tiny model: it learns, resumes exactly, stops cleanly, refuses bad input
without writing anything, and hands the model back untouched."""

from __future__ import annotations

import math

import pytest
import torch

from dreamartist_ext import files
from dreamartist_ext.adapters import BranchAdapters
from dreamartist_ext.concepts import load_concept
from dreamartist_ext.config import TrainConfig
from dreamartist_ext.data import ImageInputError
from dreamartist_ext.embeddings import create_pair
from dreamartist_ext.guidance import GuidanceSchedule
from dreamartist_ext.logs import LossLog
from dreamartist_ext.model import frozen
from dreamartist_ext.objective import LossInputs, dreamartist_loss
from dreamartist_ext.errors import InvalidInput, TrainingError
from dreamartist_ext.outputs import OutputLayout, create_pair_files
from dreamartist_ext.trainer import TrainCallbacks
from support import make_trainer, state_fingerprint, tree_snapshot, write_image


def small_config(images, **overrides) -> TrainConfig:
    values = dict(
        name="cube", images=[str(p) for p in images], width=32, height=32, steps=6, save_every=0, preview_every=0,
        unet_rank=2, text_rank=2, reconstruction_weight=0.5, embedding_lr="0.005", unet_lr="1e-3", text_lr="1e-3",
        template="subject",
    )
    values.update(overrides)
    return TrainConfig.from_dict(values)


def test_a_run_writes_the_pair_adapters_checkpoint_and_logs(family_binding, reference_image, tmp_path):
    binding = family_binding
    layout = OutputLayout.under(tmp_path / "out")
    config = small_config([reference_image], steps=4, save_every=2)
    result = make_trainer(binding, config, layout).run()
    assert result.status == "finished" and result.step == 4
    vectors, meta = files.load_embedding(layout.embedding_path("cube"))
    neg, neg_meta = files.load_embedding(layout.embedding_path("cube-neg"))
    assert vectors.shape == (3, binding.token_dim) and neg.shape == (3, binding.token_dim)
    assert meta["step"] == 4 and meta["role"] == "positive" and meta["partner"] == "cube-neg"
    assert neg_meta["role"] == "negative" and neg_meta["partner"] == "cube"
    assert meta["hyperparameters"]["guidance"] == "3" and meta["sd_checkpoint"] == binding.model_info().hash
    if binding.family == "sdxl":  # the host's (and kohya's) SDXL layout: one tensor per text encoder
        from safetensors import safe_open

        with safe_open(str(layout.embedding_path("cube")), "pt") as stored:
            assert {k: stored.get_tensor(k).shape for k in stored.keys()} == {
                "clip_l": (3, binding.encoders[0].dim), "clip_g": (3, binding.encoders[1].dim)}
    assert meta["architecture"] == binding.family
    sites = {s.kohya_prefix(p) for s in binding.adapter_sites() for p in s.module_paths}
    for word in ("cube", "cube-neg"):
        layers, lora_meta = files.load_lora(layout.lora_path(word))
        assert set(layers) == sites  # every targeted layer, in the host's kohya naming
        assert lora_meta["ss_network_dim"] == 2
    assert sorted(p.name for p in layout.checkpoints_dir.iterdir()) == ["cube-000002.safetensors",
                                                                         "cube-000004.safetensors"]
    rows = LossLog(layout.loss_csv, ()).read()
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert layout.loss_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_falls_when_overfitting_one_image(family_binding, reference_image, tmp_path):
    """Measured on a fixed evaluation set of (t, noise) draws the run never sees, before and after 100 steps.

    A random tiny model cannot fit much (its noise prediction is mostly unexplainable); a working loop still
    lowers the held-out loss by about 20 % (SD 1.x, SDXL). The v-prediction model fits less in 100 steps (measured
    9 % at this rate, 4 % at 1e-2): at low t its target is the unexplainable noise, at high t the clean latent."""
    binding = family_binding
    unet_lr, required = {"sd2": ("3e-3", 0.95)}.get(binding.family, ("1e-2", 0.9))
    config = small_config([reference_image], steps=100, reconstruction_weight=0.0, embedding_lr="0.05",
                          unet_lr=unet_lr, template="none", latent_sampling="deterministic", unet_rank=4, text_rank=0)
    trainer = make_trainer(binding, config, OutputLayout.under(tmp_path / "out"))
    with torch.no_grad():
        mean, _ = binding.encode_pixels(trainer.prepared.images[0].pixels.unsqueeze(0))
    g = torch.Generator().manual_seed(123)
    evaluation = LossInputs(
        latents=mean.repeat(16, 1, 1, 1), noise=torch.randn(16, *mean.shape[1:], generator=g),
        timesteps=torch.randint(0, 1000, (16,), generator=g),
        positive_prompts=["cube"] * 16, negative_prompts=["cube-neg"] * 16,
    )

    def evaluate(words, adapters=None):
        binding.adapters = adapters
        try:
            with torch.no_grad(), binding.learned_words(words):
                return float(dreamartist_loss(binding, evaluation, guidance=GuidanceSchedule.parse("3")).total)
        finally:
            binding.adapters = None

    initial = create_pair(binding, "cube", generator=torch.Generator().manual_seed(config.seed))
    before = evaluate(initial.words())
    result = trainer.run()
    assert result.status == "finished"
    layout = OutputLayout.under(tmp_path / "out")
    concept = load_concept("cube", layout.embeddings_dir, layout.lora_dir)
    adapters = BranchAdapters.from_layers(binding.adapter_sites(), concept.adapters)
    try:
        after = evaluate(concept.words(), adapters)
    finally:
        adapters.detach()
    assert after < required * before, (before, after)


def test_resume_continues_bit_identically(family_binding, reference_image, tmp_path):
    binding = family_binding
    config = small_config([reference_image], steps=6, save_every=3, flip=True, latent_sampling="random",
                          tag_dropout=0.3, reconstruction_scale=0.5)
    straight = OutputLayout.under(tmp_path / "straight")
    make_trainer(binding, config, straight).run()
    resumed = OutputLayout.under(tmp_path / "resumed")
    partial = small_config([reference_image], steps=3, save_every=3, flip=True, latent_sampling="random",
                           tag_dropout=0.3, reconstruction_scale=0.5)
    make_trainer(binding, partial, resumed).run()
    checkpoint = resumed.checkpoints_dir / "cube-000003.safetensors"
    result = make_trainer(binding, config, resumed, resume=checkpoint).run()
    assert result.step == 6
    for word in ("cube", "cube-neg"):
        a, _ = files.load_embedding(straight.embedding_path(word))
        b, _ = files.load_embedding(resumed.embedding_path(word))
        assert torch.equal(a, b)
        la, _ = files.load_lora(straight.lora_path(word))
        lb, _ = files.load_lora(resumed.lora_path(word))
        assert all(torch.equal(la[k].down, lb[k].down) and torch.equal(la[k].up, lb[k].up) for k in la)
    straight_rows = LossLog(straight.loss_csv, ()).read()
    resumed_rows = LossLog(resumed.loss_csv, ()).read()
    assert [r["loss"] for r in straight_rows] == [r["loss"] for r in resumed_rows]


def test_resume_refuses_a_checkpoint_of_another_shape(binding, reference_image, tmp_path):
    layout = OutputLayout.under(tmp_path / "out")
    make_trainer(binding, small_config([reference_image], steps=2, save_every=2), layout).run()
    other = small_config([reference_image], steps=4, positive_vectors=5)
    with pytest.raises(TrainingError, match="positive_vectors=3"):
        make_trainer(binding, other, layout, resume=layout.checkpoints_dir / "cube-000002.safetensors").run()


def test_interrupt_stops_at_a_step_boundary_and_saves(binding, reference_image, tmp_path):
    layout = OutputLayout.under(tmp_path / "out")
    done = []
    callbacks = TrainCallbacks(on_step=lambda r: done.append(r.step), should_stop=lambda: len(done) >= 3)
    result = make_trainer(binding, small_config([reference_image], steps=50), layout, callbacks=callbacks).run()
    assert result.status == "interrupted" and result.step == 3
    _, meta = files.load_embedding(layout.embedding_path("cube"))
    assert meta["step"] == 3
    assert (layout.checkpoints_dir / "cube-000003.safetensors").exists()


@pytest.mark.parametrize("reconstruction, checkpointing", [(0.5, False), (0.0, False), (0.0, True), (0.5, True)])
def test_checkpointing_covers_the_decoder_whenever_reconstruction_decodes(binding, reference_image, tmp_path,
                                                                          reconstruction, checkpointing):
    """The decoder is recomputed in backward whenever the reconstruction loss decodes with gradient; the U-Net
    only when asked; nothing stays patched afterwards."""
    seen = []

    def checkpointed(report):
        seen.append({part: {"forward" in m.__dict__ for m in binding.checkpointed_modules(part)}
                     for part in ("unet", "decoder")})

    config = small_config([reference_image], steps=2, reconstruction_weight=reconstruction,
                          gradient_checkpointing=checkpointing)
    make_trainer(binding, config, OutputLayout.under(tmp_path / "out"), callbacks=TrainCallbacks(on_step=checkpointed)).run()
    assert binding.checkpointed_modules("unet") and binding.checkpointed_modules("decoder")
    assert seen == [{"unet": {checkpointing}, "decoder": {reconstruction > 0}}] * 2
    assert all("forward" not in m.__dict__ for part in ("unet", "decoder") for m in binding.checkpointed_modules(part))


def test_non_finite_steps_are_skipped_and_stop_the_run(binding, reference_image, tmp_path):
    """An absurd learning rate blows the embeddings up; the guard skips, counts, stops, and saves finite files."""
    layout = OutputLayout.under(tmp_path / "out")
    config = small_config([reference_image], steps=30, embedding_lr="1e30", unet_rank=0, text_rank=0,
                          max_bad_steps=3)
    result = make_trainer(binding, config, layout).run()
    assert result.status == "diverged"
    assert "not finite for 3 steps in a row" in result.message
    rows = LossLog(layout.loss_csv, ()).read()
    assert [r["skipped"] for r in rows][-3:] == [1.0, 1.0, 1.0]
    for word in ("cube", "cube-neg"):
        vectors, _ = files.load_embedding(layout.embedding_path(word))
        assert torch.isfinite(vectors).all()


def test_every_micro_batch_reaches_the_unet(family_binding, reference_image, tmp_path):
    binding = family_binding
    calls = []
    handle = binding.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        config = small_config([reference_image], steps=2, gradient_accumulation=3, batch_size=2,
                              reconstruction_weight=0)
        make_trainer(binding, config, OutputLayout.under(tmp_path / "out")).run()
    finally:
        handle.remove()
    assert calls == [4] * 6  # 2 steps x 3 micro-batches, each one call with [neg; pos] x 2 images


def test_previews_are_made_with_the_pair_in_place(binding, reference_image, tmp_path):
    from dreamartist_ext.cli import _previewer

    layout = OutputLayout.under(tmp_path / "out")
    config = small_config([reference_image], steps=4, preview_every=2)
    config.preview.steps, config.preview.count = 2, 2
    seen = []
    callbacks = TrainCallbacks(preview=_previewer(binding, config), on_preview=lambda s, p: seen.append((s, p)))
    make_trainer(binding, config, layout, callbacks=callbacks).run()
    assert [s for s, _ in seen] == [2, 4]
    assert all(p.exists() for _, paths in seen for p in paths) and len(seen[0][1]) == 2


def test_the_model_comes_back_exactly_even_when_a_run_fails(family_binding, reference_image, tmp_path):
    binding = family_binding
    before = [state_fingerprint(r) for r in binding.trainable_roots()]

    def explode():
        raise RuntimeError("boom")

    callbacks = TrainCallbacks(on_step=lambda r: explode() if r.step == 2 else None)
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(binding, small_config([reference_image]), OutputLayout.under(tmp_path / "a"),
                callbacks=callbacks).run()
    assert [state_fingerprint(r) for r in binding.trainable_roots()] == before
    assert binding.adapters is None and binding._words == {}
    make_trainer(binding, small_config([reference_image], steps=2), OutputLayout.under(tmp_path / "b")).run()
    assert [state_fingerprint(r) for r in binding.trainable_roots()] == before


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(name="../evil"), InvalidInput, "path separator|'/'"),
        (dict(name="cat-neg"), InvalidInput, "-neg"),
        (dict(guidance="3+eval('1')"), InvalidInput, "guidance"),
        (dict(embedding_lr="0.005:100, fast"), InvalidInput, "learning rate"),
        (dict(width=40), InvalidInput, "multiple of 16"),
        (dict(steps=0), InvalidInput, "steps"),
        (dict(template="no-such-template"), InvalidInput, "no-such-template"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(binding, reference_image, tmp_path, change, error,
                                                            message):
    layout = OutputLayout.under(tmp_path / "out")
    with pytest.raises(error, match=message):
        make_trainer(binding, small_config([reference_image], **change), layout).run()
    assert tree_snapshot(tmp_path / "out") == {}


def test_a_bad_image_among_good_ones_stops_everything(binding, reference_image, tmp_path):
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(reference_image.read_bytes()[:200])
    layout = OutputLayout.under(tmp_path / "out")
    with pytest.raises(ImageInputError, match="broken.png"):
        make_trainer(binding, small_config([reference_image, broken]), layout).run()
    assert tree_snapshot(tmp_path / "out") == {}


def test_an_existing_pair_is_never_overwritten_by_accident(binding, reference_image, tmp_path):
    layout = OutputLayout.under(tmp_path / "out")
    make_trainer(binding, small_config([reference_image], steps=2), layout).run()
    snapshot = tree_snapshot(tmp_path / "out")
    with pytest.raises(TrainingError, match="already exists"):
        make_trainer(binding, small_config([reference_image], steps=2), layout).run()
    assert tree_snapshot(tmp_path / "out") == snapshot
    # continuing starts from the saved vectors, adapters and step
    result = make_trainer(binding, small_config([reference_image], steps=3), layout, continue_existing=True).run()
    assert result.step == 3
    result = make_trainer(binding, small_config([reference_image], steps=1), layout, overwrite=True).run()
    assert result.step == 1


def test_plain_textual_inversion_mode_writes_no_negative(binding, reference_image, tmp_path):
    layout = OutputLayout.under(tmp_path / "out")
    config = small_config([reference_image], steps=2, use_negative=False, unet_rank=0, text_rank=0,
                          reconstruction_weight=0)
    make_trainer(binding, config, layout).run()
    assert layout.embedding_path("cube").exists() and not layout.embedding_path("cube-neg").exists()


def test_alpha_weighted_images_train(binding, tmp_path):
    image = write_image(tmp_path / "images" / "cut.png", mode="RGBA")
    from PIL import Image

    rgba = Image.open(image)
    alpha = Image.new("L", rgba.size, 0)
    alpha.paste(255, (16, 16, 48, 48))
    rgba.putalpha(alpha)
    rgba.save(image)
    result = make_trainer(binding, small_config([image], steps=2), OutputLayout.under(tmp_path / "out")).run()
    assert result.status == "finished" and math.isfinite(result.last_values["loss"])


def test_frozen_restores_requires_grad_flags(binding):
    binding.unet.conv_in.weight.requires_grad_(True)
    binding.vae.encoder.conv_in.weight.requires_grad_(False)
    with frozen(binding.trainable_roots()):
        assert not any(p.requires_grad for r in binding.trainable_roots() for p in r.parameters())
    assert binding.unet.conv_in.weight.requires_grad and not binding.vae.encoder.conv_in.weight.requires_grad


def test_a_created_pair_is_what_training_continues_from(binding, reference_image, tmp_path):
    layout = OutputLayout.under(tmp_path / "out")
    config = small_config([reference_image], steps=2, init_text="red cube", negative_vectors=6)
    written = create_pair_files(binding, config, layout)
    assert [p.name for p in written] == ["cube.safetensors", "cube-neg.safetensors"]
    vectors, meta = files.load_embedding(written[0])
    neg, _ = files.load_embedding(written[1])
    assert meta["step"] == 0 and neg.shape == (6, binding.token_dim)
    # spread over the tokens of the init text
    tokens = binding.token_vectors("red cube")
    assert torch.equal(vectors, tokens[[i * tokens.shape[0] // 3 for i in range(3)]])
    # the negative starts at the empty text plus small noise
    assert (neg - binding.end_token_vector()).abs().max() < 0.01
    with pytest.raises(TrainingError, match="already exists"):
        create_pair_files(binding, config, layout)
    result = make_trainer(binding, config, layout, continue_existing=True).run()
    assert result.step == 2


def test_continuing_records_the_saved_pairs_vector_counts(binding, reference_image, tmp_path):
    layout = OutputLayout.under(tmp_path / "out")
    create_pair_files(binding, small_config([reference_image], positive_vectors=2, negative_vectors=5), layout)
    make_trainer(binding, small_config([reference_image], steps=1), layout, continue_existing=True).run()
    vectors, meta = files.load_embedding(layout.embedding_path("cube"))
    assert vectors.shape[0] == 2 and meta["hyperparameters"]["positive_vectors"] == 2
    assert meta["hyperparameters"]["negative_vectors"] == 5


def test_ctrl_c_mid_step_drops_that_step_and_saves_a_checkpoint_that_resumes_exactly(binding, reference_image,
                                                                                      tmp_path):
    """KeyboardInterrupt inside the 4th step's U-Net call: the run saves step 3 (the boundary), and resuming from
    that checkpoint gives bit for bit what an uninterrupted run gives."""
    config = small_config([reference_image], steps=6, latent_sampling="random", tag_dropout=0.3)
    straight = OutputLayout.under(tmp_path / "straight")
    make_trainer(binding, config, straight).run()
    calls = []

    def interrupt_in_step_4(module, args, output):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt

    layout = OutputLayout.under(tmp_path / "interrupted")
    handle = binding.unet.register_forward_hook(interrupt_in_step_4)
    try:
        result = make_trainer(binding, config, layout).run()
    finally:
        handle.remove()
    assert result.status == "interrupted" and result.step == 3 and "interrupted at step 3" in result.message
    assert layout.checkpoint_path("cube", 3) in result.files and layout.loss_csv in result.files
    resumed = make_trainer(binding, config, layout, resume=layout.checkpoint_path("cube", 3)).run()
    assert resumed.status == "finished" and resumed.steps_run == 3
    assert resumed.message == "trained cube for 3 steps (from step 3 to 6)"
    for word in ("cube", "cube-neg"):
        assert torch.equal(files.load_embedding(straight.embedding_path(word))[0],
                           files.load_embedding(layout.embedding_path(word))[0])


def test_ctrl_c_in_a_callback_after_a_step_saves_that_step(binding, reference_image, tmp_path):
    def interrupt(report):
        if report.step == 2:
            raise KeyboardInterrupt

    layout = OutputLayout.under(tmp_path / "out")
    result = make_trainer(binding, small_config([reference_image], steps=10), layout,
                          callbacks=TrainCallbacks(on_step=interrupt)).run()
    assert result.status == "interrupted" and result.step == 2
    assert files.load_embedding(layout.embedding_path("cube"))[1]["step"] == 2
    assert [r["step"] for r in LossLog(layout.loss_csv, ()).read()] == [1, 2]


def test_preview_every_0_previews_only_at_the_end(binding, reference_image, tmp_path):
    seen = []
    callbacks = TrainCallbacks(preview=lambda step: [], on_preview=lambda step, paths: seen.append(step))
    make_trainer(binding, small_config([reference_image], steps=3, preview_every=0), OutputLayout.under(tmp_path),
                 callbacks=callbacks).run()
    assert seen == [3]


def test_a_name_in_another_script_with_spaces_trains(binding, reference_image, tmp_path):
    layout = OutputLayout.under(tmp_path / "out")
    result = make_trainer(binding, small_config([reference_image], name="猫の絵 v2", steps=1), layout).run()
    assert result.status == "finished"
    assert layout.embedding_path("猫の絵 v2").is_file() and layout.embedding_path("猫の絵 v2-neg").is_file()


def test_a_batch_of_differently_shaped_buckets_trains(family_binding, tmp_path):
    """Aspect-ratio buckets (as SDXL was trained): each image keeps its shape, a batch mixing shapes is evaluated
    shape by shape, and the U-Net sees both shapes."""
    binding = family_binding
    wide = write_image(tmp_path / "images" / "wide.png", size=(128, 64))
    tall = write_image(tmp_path / "images" / "tall.png", size=(64, 128), seed=1)
    shapes = []
    handle = binding.unet.register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape[-2:])))
    try:
        config = small_config([wide, tall], resize="bucket", batch_size=2, steps=2, width=48, height=48)
        result = make_trainer(binding, config, OutputLayout.under(tmp_path / "out")).run()
    finally:
        handle.remove()
    assert result.status == "finished"
    assert {(4, 8), (8, 4)} <= set(shapes)  # 64x32 and 32x64 px buckets of the 48x48 area, in latents

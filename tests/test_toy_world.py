"""The toy world (issue 11): its parts, its shipped weights, and the test that DreamArtist really learns.

The learning test trains the shipped toy model on ONE picture of a shape/colour pair it never saw in pretraining
and grades 16 generated pictures with the judge; its twin runs the same check with the objective's branches
swapped (the positive word trained as the negative side of guidance) and requires the check to fail there.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dreamartist_ext import objective
from dreamartist_ext.concepts import load_concept
from dreamartist_ext.config import TrainConfig
from dreamartist_ext.diffusers_binding import DiffusersBinding
from dreamartist_ext.outputs import OutputLayout
from dreamartist_ext.preparation import prepare_run
from dreamartist_ext.toy import JUDGE_FILE, MODEL_DIR, WEIGHTS
from dreamartist_ext.toy.demo import CONCEPT, NAME, dreamartist_options, write_reference
from dreamartist_ext.toy.evaluate import evaluate, mean_of
from dreamartist_ext.toy.judge import HEADS, judge_images, load_judge
from dreamartist_ext.toy.world import (BACKGROUNDS, COLOURS, HELD_OUT, SHAPES, WORDS, random_scene, render,
                                       training_scene)
from dreamartist_ext.trainer import Trainer

# Measured on the shipped weights at g=3 (1 and 2 CPU threads give the same figures; see the closing notes of issue 11):
# after 200 steps the learned word draws the whole concept, a purple star, in 7 of 16 pictures on brown and beige
# and the requested background in 8 of 16 (chance: 1 in 48 and 1 in 6); with the branches swapped the concept is
# in 0 of 16 (shape 3, purple 0). The thresholds leave margin on both sides. (On white and navy a g=3 star loses
# its colour, 2 of 16 purple; docs/fidelity.md has the analysis.)
LEARN_STEPS = 200
LEARN_GUIDANCE = "3"  # the paper's usual g, at which the figures above were measured (the demo trains at 1.5)
LEARN_CONTEXTS = ("brown", "beige")
SAMPLES = 8  # per context: 16 pictures
CONCEPT_THRESHOLD = 0.25
FOLLOWED_THRESHOLD = 0.25


@pytest.fixture(scope="module")
def judge():
    return load_judge(JUDGE_FILE)


def test_held_out_pairs_never_appear_in_pretraining_but_their_parts_do():
    rng = random.Random(0)
    scenes = [training_scene(rng) for _ in range(20000)]
    pairs = {s.concept for s in scenes}
    assert not pairs & set(HELD_OUT)
    assert pairs == {(s, c) for s in SHAPES for c in COLOURS} - set(HELD_OUT)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8 and len(BACKGROUNDS) >= 6


def test_rendering_is_deterministic_and_captions_read_naturally():
    scene = random_scene(random.Random(3))
    assert np.array_equal(np.asarray(render(scene)), np.asarray(render(scene)))
    assert render(scene).size == (64, 64)
    red_star = dataclasses.replace(scene, shape="star", colour="red", background="gray")
    assert red_star.caption() == "a red star on a gray background"
    assert red_star.caption(shape=False, background=False) == "a red shape"
    assert red_star.caption(shape=False, colour=False, background=False) == ""


def test_every_world_word_is_one_token_of_the_shipped_tokenizer():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    for word in WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert tokenizer.model_max_length >= 16


def test_shipped_weights_are_fp16_small_and_load_through_the_users_binding():
    files = [p for p in WEIGHTS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2 ** 20
    for path in [p for p in files if p.suffix == ".safetensors"]:
        with safe_open(str(path), "pt") as f:
            floats = {f.get_tensor(k).dtype for k in f.keys()} - {torch.int64}  # position ids stay integers
            assert floats == {torch.float16}, path
    binding = DiffusersBinding.load(MODEL_DIR)
    assert binding.family == "sd1" and binding.vae_downscale == 4 and binding.size_multiple == 16
    report = json.loads((WEIGHTS / "pretrain-report.json").read_text())
    assert report["command"].startswith("python -m dreamartist_ext.toy.pretrain")


def test_judge_is_right_on_fresh_renders_held_out_pairs_included(judge):
    rng = random.Random(12345)  # not a seed pretraining used
    scenes = [random_scene(rng) for _ in range(300)] + [random_scene(rng, *rng.choice(HELD_OUT)) for _ in range(300)]
    verdict = judge_images(judge, [render(s) for s in scenes])
    for head in HEADS:
        accuracy = np.mean([got == getattr(s, head) for got, s in zip(verdict.labels[head], scenes)])
        assert accuracy > 0.98, (head, accuracy)


def test_pretrained_model_draws_the_colour_and_shape_a_caption_asks(judge):
    from dreamartist_ext.sampling import SampleRequest, generate

    binding = DiffusersBinding.load(MODEL_DIR)
    images = generate(binding, SampleRequest("a blue triangle on a beige background", steps=20, guidance=5.0,
                                             seed=0, width=64, height=64, count=8))
    verdict = judge_images(judge, images)
    assert verdict.concept_share("triangle", "blue") >= 0.75, verdict.labels  # measured: 8 of 8
    # the background comes from the prompt, not from the seed's noise (zero terminal SNR); measured: 8 of 8
    assert verdict.share("background", "beige") >= 0.75, verdict.labels


def _learn_and_grade(tmp_path: Path, judge) -> tuple[float, float]:
    reference = write_reference(tmp_path / "reference")
    options = {**dreamartist_options(reference), "steps": LEARN_STEPS, "guidance": LEARN_GUIDANCE}
    config = TrainConfig.from_dict(options)
    layout = OutputLayout.under(tmp_path / "run")
    binding = DiffusersBinding.load(MODEL_DIR)
    result = Trainer(binding, prepare_run(config, layout, overwrite=True, native_size=64)).run()
    assert result.status == "finished", result.message
    concept = load_concept(NAME, layout.embeddings_dir, layout.lora_dir)
    results = evaluate(binding, judge, [concept], NAME, CONCEPT, Image.open(reference).convert("RGB"),
                       contexts=LEARN_CONTEXTS, samples=SAMPLES)
    return mean_of(results, "concept_kept"), mean_of(results, "context_followed")


def test_one_shot_dreamartist_draws_the_held_out_concept_in_new_contexts(tmp_path, judge):
    assert CONCEPT in HELD_OUT
    kept, followed = _learn_and_grade(tmp_path, judge)
    assert kept >= CONCEPT_THRESHOLD and followed >= FOLLOWED_THRESHOLD, (kept, followed)


def test_the_same_check_fails_when_the_objective_swaps_its_branches(tmp_path, judge, monkeypatch):
    """A method bug the check must catch: eps_hat = eps_pos + g (eps_neg - eps_pos), the words' roles swapped."""
    right = objective.guided_noise
    monkeypatch.setattr(objective, "guided_noise", lambda neg, pos, scale: right(pos, neg, scale))
    kept, followed = _learn_and_grade(tmp_path, judge)
    assert not (kept >= CONCEPT_THRESHOLD and followed >= FOLLOWED_THRESHOLD), (kept, followed)


def test_the_shipped_demo_picture_is_the_demo_scene():
    from dreamartist_ext.toy.demo import REFERENCE, REFERENCE_FILE

    assert np.array_equal(np.asarray(Image.open(REFERENCE_FILE).convert("RGB")), np.asarray(render(REFERENCE)))
    assert REFERENCE_FILE.with_suffix(".txt").read_text().strip() == f"on a {REFERENCE.background} background"

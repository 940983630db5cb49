"""The loss is the paper's formula, computed with one batched call, and its gradients go where they should —
on every family: SD 1.x (eps), SD 2.x-v (v-prediction) and SDXL (two text encoders, pooled and size
conditioning). The by-hand versions call the diffusers components directly, as the diffusers pipelines do."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import CLIPTokenizer

from dreamartist_ext.adapters import AdapterSpec, BranchAdapters
from dreamartist_ext.embeddings import EmbeddingPair
from dreamartist_ext.guidance import GuidanceSchedule
from dreamartist_ext.model import NEG, POS, frozen
from dreamartist_ext.objective import LossInputs, dreamartist_loss


def _inputs(binding, batch=2, seed=0, pixels=False, weight=False):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    inputs = LossInputs(
        latents=latents,
        noise=torch.randn(latents.shape, generator=g),
        timesteps=torch.tensor([17, 640, 999, 300][:batch]),
        positive_prompts=["a photo of a red cube", "a drawing of a blue ball", "x", "y"][:batch],
        negative_prompts=["a photo of a green cube", "a drawing of a cat", "z", "w"][:batch],
    )
    if pixels:
        inputs.pixels = torch.rand(batch, 3, 64, 64, generator=g) * 2 - 1
    if weight:
        inputs.latent_weight = torch.rand(batch, 1, 8, 8, generator=g)
        inputs.pixel_weight = torch.rand(batch, 1, 64, 64, generator=g)
    return inputs


def _ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _encode_by_hand(binding, prompts, encoders=None):
    """(context, pooled) as the diffusers pipelines build them; ``encoders`` replaces (tokenizer, model) pairs."""
    if binding.family != "sdxl":
        tokenizer, model = (encoders or [(binding.tokenizer, binding.text_encoder)])[0]
        return model(_ids(tokenizer, prompts))[0], None
    pairs = encoders or [(binding.tokenizer, binding.text_encoder), (binding.tokenizer_2, binding.text_encoder_2)]
    ids = [_ids(tokenizer, prompts) for tokenizer, _ in pairs]
    hidden = [model(i, output_hidden_states=True) for i, (_, model) in zip(ids, pairs)]
    # pooled: the second encoder's final state at the (first) end token, projected
    ends = (ids[1] == pairs[1][0].eos_token_id).int().argmax(-1)
    pooled = pairs[1][1].text_projection(hidden[1].last_hidden_state[torch.arange(len(prompts)), ends])
    return torch.cat([h.hidden_states[-2] for h in hidden], dim=-1), pooled


def _out_by_hand(binding, latents, t, prompts):
    """The U-Net's raw output (eps, or v for the v-prediction family) for prompts at a 64x64 training size."""
    context, pooled = _encode_by_hand(binding, prompts)
    if binding.family != "sdxl":
        return binding.unet(latents, t, encoder_hidden_states=context).sample
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * len(prompts), dtype=torch.float32)
    return binding.unet(latents, t, encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def _target_by_hand(binding, inputs, a):
    if binding.prediction_type == "v_prediction":
        return a.sqrt() * inputs.noise - (1 - a).sqrt() * inputs.latents
    return inputs.noise


def _clean_by_hand(binding, z_t, out_hat, a):
    if binding.prediction_type == "v_prediction":
        return a.sqrt() * z_t - (1 - a).sqrt() * out_hat
    return (z_t - (1 - a).sqrt() * out_hat) / a.sqrt()


def test_the_tiny_families_are_what_they_stand_for(tiny_family_dirs):
    from dreamartist_ext.diffusers_binding import DiffusersBinding

    facts = {family: DiffusersBinding.load(folder) for family, folder in tiny_family_dirs.items()}
    assert {f: (b.family, b.prediction_type, [e.key for e in b.encoders], b.native_size) for f, b in facts.items()} == {
        "sd1": ("sd1", "epsilon", ["clip_l"], 512),
        "sd2": ("sd2", "v_prediction", ["clip_h"], 768),
        "sdxl": ("sdxl", "epsilon", ["clip_l", "clip_g"], 1024),
    }
    assert facts["sdxl"].token_dim == sum(e.dim for e in facts["sdxl"].encoders) == 32 + 48
    # the CLI validates a run at the size it will train at before loading: the config files tell the same size
    from dreamartist_ext.diffusers_binding import native_size_of

    assert {f: native_size_of(folder) for f, folder in tiny_family_dirs.items()} == {
        f: b.native_size for f, b in facts.items()}


@torch.no_grad()
def test_loss_equals_the_formula_computed_by_hand(family_binding):
    binding = family_binding
    inputs = _inputs(binding)
    guidance = GuidanceSchedule.parse("3")
    terms = dreamartist_loss(binding, inputs, guidance=guidance)

    a = binding.alphas_cumprod[inputs.timesteps].view(-1, 1, 1, 1)
    z_t = a.sqrt() * inputs.latents + (1 - a).sqrt() * inputs.noise
    # two separate U-Net calls, one per branch: the batched call must agree
    out_n = _out_by_hand(binding, z_t, inputs.timesteps, inputs.negative_prompts)
    out_p = _out_by_hand(binding, z_t, inputs.timesteps, inputs.positive_prompts)
    out_hat = out_n + 3.0 * (out_p - out_n)
    expected = ((_target_by_hand(binding, inputs, a) - out_hat) ** 2).mean()
    assert terms.reconstruction is None
    torch.testing.assert_close(terms.total, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.denoise, expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_reconstruction_and_weights_follow_the_formula(family_binding):
    binding = family_binding
    inputs = _inputs(binding, pixels=True, weight=True)
    guidance = GuidanceSchedule.parse("1-5:cos2")
    terms = dreamartist_loss(binding, inputs, guidance=guidance, reconstruction_weight=0.5)

    t = inputs.timesteps
    a = binding.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * inputs.latents + (1 - a).sqrt() * inputs.noise
    g = (1 + 4 * (1 - torch.cos(math.pi * t.float() / 999)) / 2).view(-1, 1, 1, 1)
    out_n = _out_by_hand(binding, z_t, t, inputs.negative_prompts)
    out_p = _out_by_hand(binding, z_t, t, inputs.positive_prompts)
    out_hat = out_n + g * (out_p - out_n)
    w = inputs.latent_weight.expand(-1, 4, -1, -1)
    target = _target_by_hand(binding, inputs, a)
    mse = (((target - out_hat) ** 2 * w).sum((1, 2, 3)) / w.sum((1, 2, 3))).mean()
    z0 = _clean_by_hand(binding, z_t, out_hat, a)
    decoded = binding.vae.decode(z0 / binding.latent_scale_factor).sample
    pw = inputs.pixel_weight.expand(-1, 3, -1, -1)
    rec = (((decoded - inputs.pixels).abs() * pw).sum((1, 2, 3)) / pw.sum((1, 2, 3))).mean()
    torch.testing.assert_close(terms.denoise, mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.reconstruction, rec, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.total, mse + 0.5 * rec, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_plain_textual_inversion_mode_uses_the_positive_branch_only(family_binding):
    binding = family_binding
    inputs = _inputs(binding)
    inputs.negative_prompts = None
    terms = dreamartist_loss(binding, inputs, guidance=GuidanceSchedule(1.0, 1.0))
    a = binding.alphas_cumprod[inputs.timesteps].view(-1, 1, 1, 1)
    z_t = a.sqrt() * inputs.latents + (1 - a).sqrt() * inputs.noise
    out_p = _out_by_hand(binding, z_t, inputs.timesteps, inputs.positive_prompts)
    expected = ((_target_by_hand(binding, inputs, a) - out_p) ** 2).mean()
    torch.testing.assert_close(terms.total, expected, rtol=1e-5, atol=1e-6)


def test_learned_words_are_injected_like_added_tokens(family_binding, tiny_family_dirs):
    """Our placeholder injection gives exactly what tokenizers with real added tokens give; on SDXL each
    encoder gets its own slice of the word's row, and the pooled vector is taken at the real end token."""
    binding = family_binding
    vectors = torch.randn(3, binding.token_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), binding.learned_words({"mycat": vectors}):
        ours = binding.encode_prompts(["a photo of MyCat on grass"], [POS], (64, 64))

    encoders, offset = [], 0
    models = [binding.text_encoder] + ([binding.text_encoder_2] if binding.family == "sdxl" else [])
    for index, model in enumerate(models):
        tokenizer = CLIPTokenizer.from_pretrained(tiny_family_dirs[binding.family] / ("tokenizer", "tokenizer_2")[index])
        tokenizer.add_tokens(["<w0>", "<w1>", "<w2>"])
        encoder = copy.deepcopy(model)
        width = encoder.get_input_embeddings().embedding_dim
        encoder.resize_token_embeddings(len(tokenizer))
        with torch.no_grad():
            for i in range(3):
                row = vectors[i, offset:offset + width]
                encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(f"<w{i}>")] = row
        encoders.append((tokenizer, encoder))
        offset += width
    assert offset == binding.token_dim
    with torch.no_grad():
        context, pooled = _encode_by_hand(binding, ["a photo of <w0><w1><w2> on grass"], encoders)
    if binding.family == "sdxl":
        torch.testing.assert_close(ours["crossattn"], context, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours["text_embeds"], pooled, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(ours, context, rtol=0, atol=1e-6)


def test_gradients_reach_exactly_the_trainable_tensors(family_binding):
    binding = family_binding
    pair = EmbeddingPair("cube", torch.randn(3, binding.token_dim) * 0.02, torch.randn(3, binding.token_dim) * 0.02)
    pair = pair.trainable(binding.device)
    specs = {part: {POS: AdapterSpec(2, 2.0), NEG: AdapterSpec(2, 2.0)} for part in ("unet", "te")}
    inputs = _inputs(binding, pixels=True)
    inputs.positive_prompts = ["a photo of cube", "cube on a table"]
    inputs.negative_prompts = ["a photo of cube-neg", "cube-neg on a table"]
    with frozen(binding.trainable_roots()), BranchAdapters(binding.adapter_sites(), specs,
                                                           generator=torch.Generator().manual_seed(0)) as adapters:
        binding.adapters = adapters
        # B starts at zero (so A gets no gradient at init); give B values to see every adapter tensor learn
        with torch.no_grad():
            for branch in (POS, NEG):
                for p in adapters.parameters(branch):
                    if p.abs().sum() == 0:
                        p.normal_(0, 0.01)
        with binding.learned_words(pair.words()):
            terms = dreamartist_loss(binding, inputs, guidance=GuidanceSchedule.parse("3"), reconstruction_weight=1)
            terms.total.backward()
        trainable = [pair.positive, pair.negative] + adapters.parameters(POS) + adapters.parameters(NEG)
        for tensor in trainable:
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0
        trainable_ids = {id(t) for t in trainable}
        for root in binding.trainable_roots():
            for name, p in root.named_parameters():
                if id(p) not in trainable_ids:
                    assert p.grad is None, f"frozen parameter {name} got a gradient"
        binding.adapters = None


def test_reconstruction_gradient_reaches_the_embeddings(family_binding):
    """The pixel term alone moves the embeddings: the decode keeps its graph (the old extension's bug)."""
    binding = family_binding
    pair = EmbeddingPair("cube", torch.randn(3, binding.token_dim), torch.randn(3, binding.token_dim)).trainable(
        binding.device
    )
    inputs = _inputs(binding, batch=1, pixels=True)
    inputs.timesteps = torch.tensor([200])
    inputs.positive_prompts, inputs.negative_prompts = ["cube"], ["cube-neg"]
    with frozen(binding.trainable_roots()), binding.learned_words(pair.words()):
        terms = dreamartist_loss(binding, inputs, guidance=GuidanceSchedule.parse("3"), reconstruction_weight=1)
        terms.reconstruction.backward()
    assert pair.positive.grad is not None and pair.positive.grad.abs().sum() > 0
    assert pair.negative.grad is not None and pair.negative.grad.abs().sum() > 0


def test_micro_batches_add_up_to_one_big_batch(family_binding):
    """Per-sample means averaged over the batch: k micro-batches of 1 (each loss / k) = one batch of k."""
    binding = family_binding
    pair = EmbeddingPair("cube", torch.randn(3, binding.token_dim), torch.randn(3, binding.token_dim))
    guidance = GuidanceSchedule.parse("3")
    inputs = _inputs(binding, batch=3, pixels=True, weight=True)
    inputs.positive_prompts = ["cube", "a cube", "the cube"]
    inputs.negative_prompts = ["cube-neg", "a cube-neg", "the cube-neg"]

    def grads(batches):
        p = pair.trainable(binding.device)
        with frozen(binding.trainable_roots()), binding.learned_words(p.words()):
            for part in batches:
                terms = dreamartist_loss(binding, part, guidance=guidance, reconstruction_weight=0.7)
                (terms.total / len(batches)).backward()
        return p.positive.grad, p.negative.grad

    def row(i):
        return LossInputs(
            latents=inputs.latents[i:i + 1], noise=inputs.noise[i:i + 1], timesteps=inputs.timesteps[i:i + 1],
            positive_prompts=inputs.positive_prompts[i:i + 1], negative_prompts=inputs.negative_prompts[i:i + 1],
            latent_weight=inputs.latent_weight[i:i + 1], pixels=inputs.pixels[i:i + 1],
            pixel_weight=inputs.pixel_weight[i:i + 1],
        )

    whole = grads([inputs])
    parts = grads([row(i) for i in range(3)])
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_reconstruction_needs_pixels(binding):
    with pytest.raises(ValueError, match="reference pixels"):
        dreamartist_loss(binding, _inputs(binding), guidance=GuidanceSchedule.parse("3"), reconstruction_weight=1)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family_binding):
    """Recomputed blocks replay the adapter routing of the original call: same numbers, routed per branch."""
    binding = family_binding
    specs = {part: {POS: AdapterSpec(2, 2.0), NEG: AdapterSpec(2, 2.0)} for part in ("unet", "te")}
    inputs = _inputs(binding, pixels=True)
    inputs.positive_prompts = ["a photo of cube", "cube on a table"]
    inputs.negative_prompts = ["a photo of cube-neg", "cube-neg on a table"]
    base = EmbeddingPair("cube", torch.randn(3, binding.token_dim) * 0.02, torch.randn(3, binding.token_dim) * 0.02)

    def run(checkpointing):
        pair = base.trainable(binding.device)
        with frozen(binding.trainable_roots()), BranchAdapters(
            binding.adapter_sites(), specs, generator=torch.Generator().manual_seed(0)
        ) as adapters:
            binding.adapters = adapters
            with torch.no_grad():
                for branch, seed in ((POS, 1), (NEG, 2)):
                    g = torch.Generator().manual_seed(seed)
                    for p in adapters.parameters(branch):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            binding.set_gradient_checkpointing(checkpointing)
            try:
                with binding.learned_words(pair.words()):
                    terms = dreamartist_loss(binding, inputs, guidance=GuidanceSchedule.parse("3"),
                                             reconstruction_weight=1)
                    terms.total.backward()
            finally:
                binding.set_gradient_checkpointing(False)
                binding.adapters = None
            grads = [pair.positive.grad, pair.negative.grad] + [p.grad.clone() for p in
                                                                  adapters.parameters(POS) + adapters.parameters(NEG)]
        return terms.total.detach(), grads

    plain_loss, plain_grads = run(False)
    ckpt_loss, ckpt_grads = run(True)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8)
    assert all("forward" not in m.__dict__ for part in ("unet", "decoder") for m in binding.checkpointed_modules(part))

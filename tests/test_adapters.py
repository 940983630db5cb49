"""Positive/negative adapters: each changes only its own branch's rows, composes exactly, and leaves no trace."""

from __future__ import annotations

import pytest
import torch

from dreamartist_ext import files
from dreamartist_ext.adapters import AdapterError, AdapterSpec, BranchAdapters, compose_layers
from dreamartist_ext.model import NEG, POS
from support import conditioning_row, random_conditioning, state_fingerprint

BOTH = {POS: AdapterSpec(4, 4.0), NEG: AdapterSpec(4, 4.0)}


def _randomize(adapters, branch, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters(branch):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _unet_call(binding, branches):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=g).repeat(len(branches), 1, 1, 1)  # identical rows
    t = torch.full((len(branches),), 400)
    ctx = random_conditioning(binding, len(branches), g)
    with torch.no_grad():
        return binding.predict(x, t, ctx, branches)


@pytest.mark.parametrize("trained", [NEG, POS])
def test_an_adapter_changes_only_its_own_branch_rows(family_binding, trained):
    binding = family_binding
    base = _unet_call(binding, [NEG, POS])
    with BranchAdapters(binding.adapter_sites(), {"unet": BOTH}) as adapters:
        binding.adapters = adapters
        _randomize(adapters, trained, seed=1)  # the other branch keeps its zero-initialised B
        routed = _unet_call(binding, [NEG, POS])
        binding.adapters = None
    own = 0 if trained == NEG else 1
    other = 1 - own
    assert not torch.allclose(routed[own], base[own], atol=1e-4)
    assert torch.equal(routed[other], base[other])


def test_each_row_gets_exactly_its_branch_adapter(family_binding):
    """With both adapters trained, a mixed batch equals each branch computed on its own (on SDXL, both text
    encoders and the pooled vector included)."""
    binding = family_binding
    with BranchAdapters(binding.adapter_sites(), {"unet": BOTH, "te": BOTH}) as adapters:
        binding.adapters = adapters
        _randomize(adapters, POS, seed=1)
        _randomize(adapters, NEG, seed=2)
        mixed = _unet_call(binding, [NEG, POS, NEG])
        only_neg = _unet_call(binding, [NEG, NEG, NEG])
        only_pos = _unet_call(binding, [POS, POS, POS])
        text_mixed = binding.encode_prompts(["a cat", "a cat"], [NEG, POS])
        text_neg = binding.encode_prompts(["a cat", "a cat"], [NEG, NEG])
        text_pos = binding.encode_prompts(["a cat", "a cat"], [POS, POS])
        binding.adapters = None
    torch.testing.assert_close(mixed[0], only_neg[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[2], only_neg[2], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], only_pos[1], rtol=0, atol=1e-5)
    assert not torch.allclose(only_neg[0], only_pos[0], atol=1e-4)
    row = conditioning_row
    torch.testing.assert_close(row(text_mixed, 0), row(text_neg, 0), rtol=0, atol=1e-5)
    torch.testing.assert_close(row(text_mixed, 1), row(text_pos, 1), rtol=0, atol=1e-5)
    assert not torch.allclose(row(text_neg, 0), row(text_pos, 0), atol=1e-4)
    if binding.family == "sdxl":  # the pooled vector comes through the second encoder's adapters too
        assert not torch.allclose(text_neg["text_embeds"][0], text_pos["text_embeds"][0], atol=1e-4)


def test_unrouted_calls_run_the_base_weights(binding):
    base = _unet_call(binding, [POS, NEG])
    with BranchAdapters(binding.adapter_sites(), {"unet": BOTH}) as adapters:
        _randomize(adapters, POS, 1)
        _randomize(adapters, NEG, 2)
        # binding.adapters not set: nobody routes, so the wrapped layers must act as the originals
        unrouted = _unet_call(binding, [POS, NEG])
    assert torch.equal(unrouted, base)


def test_detach_restores_the_model_exactly(binding):
    roots = binding.trainable_roots()
    before = [state_fingerprint(r) for r in roots]
    modules_before = {name: m for name, m in binding.unet.named_modules()}
    with BranchAdapters(binding.adapter_sites(), {"unet": BOTH, "te": BOTH}) as adapters:
        assert adapters.parameters(POS) and adapters.parameters(NEG)
        assert any("lora_A" in n for n, _ in binding.unet.named_parameters())
    assert [state_fingerprint(r) for r in roots] == before
    assert {name: m for name, m in binding.unet.named_modules()} == modules_before


def test_failed_attach_leaves_no_adapter_behind(binding):
    sites = binding.adapter_sites()
    bad = type(sites[0])("unet", binding.unet, sites[0].module_paths + ("conv_in",), sites[0].kohya_prefix)
    before = state_fingerprint(binding.unet)
    with pytest.raises(AdapterError, match="conv_in is a Conv2d"):
        BranchAdapters([bad], {"unet": BOTH}).attach()
    assert state_fingerprint(binding.unet) == before


def test_export_file_and_reload_reproduce_the_outputs(binding, tmp_path):
    with BranchAdapters(binding.adapter_sites(), {"unet": BOTH, "te": BOTH}) as adapters:
        binding.adapters = adapters
        _randomize(adapters, POS, 1)
        _randomize(adapters, NEG, 2)
        expected = _unet_call(binding, [NEG, POS])
        text_expected = binding.encode_prompts(["a dog"], [POS])
        for branch in (POS, NEG):
            files.save_lora(tmp_path / f"{branch}.safetensors", adapters.export(branch), {"role": branch})
        binding.adapters = None
    loaded = {branch: files.load_lora(tmp_path / f"{branch}.safetensors")[0] for branch in (POS, NEG)}
    adapters = BranchAdapters.from_layers(binding.adapter_sites(), loaded)
    try:
        binding.adapters = adapters
        torch.testing.assert_close(_unet_call(binding, [NEG, POS]), expected, rtol=0, atol=0)
        torch.testing.assert_close(binding.encode_prompts(["a dog"], [POS]), text_expected, rtol=0, atol=0)
    finally:
        binding.adapters = None
        adapters.detach()


def test_composed_adapters_add_their_deltas_exactly():
    g = torch.Generator().manual_seed(0)

    def layer(rank, alpha):
        return files.LoraLayer(torch.randn(rank, 6, generator=g), torch.randn(5, rank, generator=g), alpha)

    a = {"m": layer(2, 1.0), "only_a": layer(3, 3.0)}
    b = {"m": layer(4, 8.0)}
    composed = compose_layers([(a, 0.5), (b, 2.0)])

    def delta(w):
        return (w.alpha / w.down.shape[0]) * w.up @ w.down

    torch.testing.assert_close(delta(composed["m"]), 0.5 * delta(a["m"]) + 2.0 * delta(b["m"]))
    torch.testing.assert_close(delta(composed["only_a"]), 0.5 * delta(a["only_a"]))
    assert composed["m"].down.shape[0] == 6


def test_layers_for_another_model_are_refused(binding):
    foreign = {POS: {"lora_unet_not_a_layer": files.LoraLayer(torch.zeros(2, 4), torch.zeros(4, 2), 2.0)}}
    before = state_fingerprint(binding.unet)
    with pytest.raises(AdapterError, match="does not match this model"):
        BranchAdapters.from_layers(binding.adapter_sites(), foreign)
    assert state_fingerprint(binding.unet) == before

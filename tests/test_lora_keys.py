"""Layer-name mappings checked against real architectures (built on the meta device: names and shapes, no memory)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from dreamartist_ext.lora_keys import (
    SD15_LAYOUT,
    UnetLayout,
    compvis_to_diffusers_unet,
    diffusers_to_compvis_unet,
    kohya_prefix,
    module_path_for_prefix,
)

ATTENTION_PROJECTION = re.compile(r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)")
TEXT_ENCODER_LINEAR = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
DIFFUSERS_TRANSFORMER = re.compile(r"(down_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.0|up_blocks\.\d+\.attentions\.\d+)")
COMPVIS_TRANSFORMER = re.compile(r"(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)(\.|$)")

SD15_COMPVIS_TRANSFORMERS = {f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)} | {"middle_block.1"} | {
    f"output_blocks.{i}.1" for i in range(3, 12)
}
# shared/webui/tiny-sd1.yaml: channel_mult [1, 2], num_res_blocks 1, attention_resolutions [2, 1]
TINY_LDM = dict(channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2, 1])


def build_diffusers_unet(**config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def build_tiny_diffusers_unet():
    return build_diffusers_unet(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=2,
    )


def transformer_paths(modules: dict[str, torch.nn.Module]) -> list[str]:
    """Every module path inside a diffusers U-Net transformer, the transformer itself included."""
    return [name for name in modules if DIFFUSERS_TRANSFORMER.match(name)]


@pytest.fixture(scope="module")
def sd15_unet():
    # diffusers' default UNet2DConditionModel config is the SD1.x architecture apart from the context width.
    unet = build_diffusers_unet(cross_attention_dim=768)
    parameters = sum(parameter.numel() for parameter in unet.parameters())
    assert round(parameters / 1e6, 1) == 859.5  # the SD1.5 U-Net
    return unet


@pytest.fixture(scope="module")
def sd15_unet_modules(sd15_unet) -> dict[str, torch.nn.Module]:
    return dict(sd15_unet.named_modules())


@pytest.fixture(scope="module")
def clip_l_modules() -> dict[str, torch.nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    return dict(model.named_modules())


# --- kohya prefixes ------------------------------------------------------------------------------------------


def test_examples_from_the_kohya_layout():
    assert (
        kohya_prefix("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
        == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    assert (
        kohya_prefix("te", "text_model.encoder.layers.0.self_attn.q_proj")
        == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    )


def test_every_unet_attention_projection_has_a_unique_reversible_prefix(sd15_unet_modules):
    projections = [name for name in sd15_unet_modules if ATTENTION_PROJECTION.fullmatch(name)]
    assert len(projections) == 16 * 2 * 4  # 16 transformer blocks, attn1 + attn2, q/k/v/out
    assert all(isinstance(sd15_unet_modules[name], torch.nn.Linear) for name in projections)

    prefixes = [kohya_prefix("unet", name) for name in projections]
    assert len(set(prefixes)) == len(prefixes)
    assert all(prefix.startswith("lora_unet_") and "." not in prefix for prefix in prefixes)
    for name, prefix in zip(projections, prefixes):
        assert module_path_for_prefix(prefix, sd15_unet_modules) == name


def test_every_text_encoder_linear_has_a_unique_reversible_prefix(clip_l_modules):
    linears = [name for name in clip_l_modules if TEXT_ENCODER_LINEAR.fullmatch(name)]
    assert len(linears) == 12 * 6
    assert all(isinstance(clip_l_modules[name], torch.nn.Linear) for name in linears)

    prefixes = [kohya_prefix("te", name) for name in linears]
    assert len(set(prefixes)) == len(prefixes)
    assert all(re.fullmatch(r"lora_te_text_model_encoder_layers_\d+_\w+", prefix) for prefix in prefixes)
    for name, prefix in zip(linears, prefixes):
        assert module_path_for_prefix(prefix, clip_l_modules) == name


def test_prefix_resolution_misses_and_ambiguity():
    assert module_path_for_prefix("lora_unet_nothing_here", ["down_blocks.0"]) is None
    assert module_path_for_prefix("lora_te3_text_model_x", ["text_model.x"]) is None  # no such part
    assert module_path_for_prefix("lora_unet_a_b", ["a.b", "a.b"]) == "a.b"
    with pytest.raises(ValueError, match="ambiguous"):
        module_path_for_prefix("lora_unet_a_b_c", ["a.b_c", "a_b.c"])


@pytest.mark.parametrize(
    "part, path",
    [
        ("vae", "decoder.conv_in"),
        ("unet", ""),
        ("unet", "down_blocks..attentions"),
        ("te", "text_model.embeddings.token_embedding"),  # the host maps only encoder layers
        ("te", "encoder.layers.0.mlp.fc1"),
    ],
)
def test_kohya_prefix_refuses_what_the_host_cannot_use(part, path):
    with pytest.raises(ValueError):
        kohya_prefix(part, path)


# --- diffusers <-> compvis (ldm) U-Net names -----------------------------------------------------------------


def test_sd15_transformer_paths_round_trip(sd15_unet_modules):
    paths = transformer_paths(sd15_unet_modules)
    assert len(paths) > 16 * 20
    compvis = [diffusers_to_compvis_unet(path) for path in paths]
    assert len(set(compvis)) == len(paths)
    assert [compvis_to_diffusers_unet(path) for path in compvis] == paths


def test_sd15_compvis_names_are_exactly_the_sd1_transformer_blocks(sd15_unet_modules):
    paths = transformer_paths(sd15_unet_modules)
    roots = {COMPVIS_TRANSFORMER.match(diffusers_to_compvis_unet(path))[1] for path in paths}
    assert roots == SD15_COMPVIS_TRANSFORMERS
    blocks = [path for path in paths if path.endswith(".transformer_blocks.0")]
    assert len(blocks) == 16
    # Both namings number blocks in forward order: along the down path and along the up path the ldm block
    # index must increase as the diffusers transformers do.
    for group, compvis_group in (("down_blocks.", "input_blocks."), ("up_blocks.", "output_blocks.")):
        roots_in_order = [path for path in paths if path.startswith(group) and DIFFUSERS_TRANSFORMER.fullmatch(path)]
        indices = [int(diffusers_to_compvis_unet(path).split(".")[1]) for path in roots_in_order]
        assert all(diffusers_to_compvis_unet(path).startswith(compvis_group) for path in roots_in_order)
        assert indices == sorted(indices) and len(set(indices)) == len(indices)


def test_layout_derived_from_the_diffusers_config_is_sd15(sd15_unet):
    assert UnetLayout.from_diffusers_config(sd15_unet.config) == SD15_LAYOUT
    assert UnetLayout.from_ldm_config([1, 2, 4, 4], 2, [4, 2, 1]) == SD15_LAYOUT


def test_tiny_layout_round_trips_and_matches_the_tiny_ldm_config():
    unet = build_tiny_diffusers_unet()
    layout = UnetLayout.from_diffusers_config(unet.config)
    assert layout == UnetLayout.from_ldm_config(**TINY_LDM)
    paths = transformer_paths(dict(unet.named_modules()))
    compvis = [diffusers_to_compvis_unet(path, layout) for path in paths]
    assert [compvis_to_diffusers_unet(path, layout) for path in compvis] == paths
    roots = {COMPVIS_TRANSFORMER.match(path)[1] for path in compvis}
    # 1 res block per level: input block 2 is the downsampler; each up level has 2 blocks
    assert roots == {"input_blocks.1.1", "input_blocks.3.1", "middle_block.1"} | {f"output_blocks.{i}.1" for i in range(4)}


@pytest.mark.parametrize(
    "path",
    [
        "down_blocks.3.attentions.0.proj_in",  # the lowest level has no attention in SD1
        "down_blocks.0.attentions.2.proj_in",  # only 2 transformers per down level
        "up_blocks.0.attentions.0.proj_in",  # the first up level has no attention
        "up_blocks.1.attentions.3.proj_in",  # 3 per up level
        "down_blocks.0.resnets.0.conv1",  # resnets are not translated
        "down_blocks.0.attentions.0.bogus",
        "mid_block.resnets.0.conv1",
        "conv_in",
    ],
)
def test_unsupported_diffusers_paths_are_refused(path):
    with pytest.raises(ValueError):
        diffusers_to_compvis_unet(path)


@pytest.mark.parametrize(
    "path",
    [
        "input_blocks.0.1",  # conv_in block
        "input_blocks.3.1",  # downsampler block
        "input_blocks.10.1.proj_in",  # lowest level: ResBlocks only
        "input_blocks.1.0.in_layers.0",  # the ResBlock of a block
        "output_blocks.2.1.conv",  # the upsampler of the first up level
        "output_blocks.12.1",
        "middle_block.0.in_layers.0",
        "middle_block.1.attn1.to_q",
        "diffusion_model.input_blocks.1.1.proj_in",  # paths are relative to the U-Net
    ],
)
def test_unsupported_compvis_paths_are_refused(path):
    with pytest.raises(ValueError):
        compvis_to_diffusers_unet(path)


# --- against the host's own ldm U-Net ------------------------------------------------------------------------


def host_unet_classes(repository: str, package: str):
    """(UNetModel, SpatialTransformer) of the host's ``package`` (ldm or sgm) in repositories/<repository>."""
    import importlib

    webui = os.environ.get("SD_WEBUI_DIR")
    if not webui:
        pytest.skip(f"SD_WEBUI_DIR is not set: cannot check against the host's {package} UNetModel")
    root = Path(webui) / "repositories" / repository
    if not (root / package).is_dir():
        pytest.skip(f"{root} has no {package} package: cannot check against the host's {package} UNetModel")
    sys.path.insert(0, str(root))
    try:
        attention = importlib.import_module(f"{package}.modules.attention")
        openaimodel = importlib.import_module(f"{package}.modules.diffusionmodules.openaimodel")
    except ImportError as error:
        pytest.skip(f"the host's {package} code does not import here: {error}")
    finally:
        sys.path.remove(str(root))
    return openaimodel.UNetModel, attention.SpatialTransformer


@pytest.fixture(scope="module")
def ldm_unet_class():
    return host_unet_classes("stable-diffusion-stability-ai", "ldm")


def build_ldm_unet(unet_class, *, model_channels, channel_mult, num_res_blocks, attention_resolutions, num_heads):
    with torch.device("meta"):
        return unet_class(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=model_channels,
            attention_resolutions=attention_resolutions,
            num_res_blocks=num_res_blocks,
            channel_mult=channel_mult,
            num_heads=num_heads,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=768,
            use_checkpoint=False,
            legacy=False,
        )


def assert_same_transformers(ldm_unet, transformer_class, diffusers_unet, layout):
    ldm_modules = dict(ldm_unet.named_modules())
    roots = [name for name, module in ldm_modules.items() if isinstance(module, transformer_class)]
    ldm_paths = [name for name in ldm_modules if any(name == root or name.startswith(root + ".") for root in roots)]
    diffusers_modules = dict(diffusers_unet.named_modules())
    diffusers_paths = transformer_paths(diffusers_modules)

    # Within the down path and within the up path both models register their transformers in forward order,
    # so the pairs must keep that order (this catches swaps between same-shaped blocks of one level).
    diffusers_roots = [path for path in diffusers_paths if DIFFUSERS_TRANSFORMER.fullmatch(path)]
    mapped_roots = [compvis_to_diffusers_unet(root, layout) for root in roots]
    for group in ("down_blocks.", "mid_block.", "up_blocks."):
        assert [r for r in mapped_roots if r.startswith(group)] == [r for r in diffusers_roots if r.startswith(group)]
    assert {compvis_to_diffusers_unet(path, layout) for path in ldm_paths} == set(diffusers_paths)
    assert {diffusers_to_compvis_unet(path, layout) for path in diffusers_paths} == set(ldm_paths)
    # Same place in the network: every weight has the same shape on both sides.
    for path in ldm_paths:
        ldm_weight = getattr(ldm_modules[path], "weight", None)
        if isinstance(ldm_weight, torch.Tensor):
            diffusers_weight = diffusers_modules[compvis_to_diffusers_unet(path, layout)].weight
            assert ldm_weight.shape == diffusers_weight.shape, path


def test_mapping_matches_the_host_ldm_unet_sd15(ldm_unet_class, sd15_unet):
    unet_class, transformer_class = ldm_unet_class
    ldm_unet = build_ldm_unet(
        unet_class, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attention_resolutions=[4, 2, 1], num_heads=8
    )
    roots = {name for name, module in ldm_unet.named_modules() if isinstance(module, transformer_class)}
    assert roots == SD15_COMPVIS_TRANSFORMERS
    assert_same_transformers(ldm_unet, transformer_class, sd15_unet, SD15_LAYOUT)


def test_mapping_matches_the_host_ldm_unet_tiny(ldm_unet_class):
    unet_class, transformer_class = ldm_unet_class
    ldm_unet = build_ldm_unet(unet_class, model_channels=32, num_heads=2, **TINY_LDM)
    assert_same_transformers(ldm_unet, transformer_class, build_tiny_diffusers_unet(), UnetLayout.from_ldm_config(**TINY_LDM))


# --- SDXL: the diffusers U-Net against the host's own sgm U-Net --------------------------------------------------

# bench/gpu_check.py builds its SDXL-size model from this same config
from gpu_check import SDXL_UNET as SDXL_DIFFUSERS  # noqa: E402


@pytest.fixture(scope="module")
def sgm_unet_class():
    return host_unet_classes("generative-models", "sgm")


def test_sdxl_mapping_matches_the_host_sgm_unet(sgm_unet_class):
    """kohya's SDXL files name the U-Net as sgm does: our diffusers paths translate onto exactly the host's
    transformer modules of a full-size SDXL base U-Net (level 0 without attention, depths 2 and 10)."""
    unet_class, transformer_class = sgm_unet_class
    with torch.device("meta"):
        sgm_unet = unet_class(
            adm_in_channels=2816, num_classes="sequential", use_checkpoint=False, in_channels=4, out_channels=4,
            model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
            num_head_channels=64, use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
            use_spatial_transformer=True, legacy=False,
        )
    diffusers_unet = build_diffusers_unet(**SDXL_DIFFUSERS)
    assert round(sum(p.numel() for p in diffusers_unet.parameters()) / 1e6) == 2567  # the SDXL base U-Net
    layout = UnetLayout.from_diffusers_config(diffusers_unet.config)
    assert layout == UnetLayout.from_ldm_config([1, 2, 4], 2, [4, 2])
    assert_same_transformers(sgm_unet, transformer_class, diffusers_unet, layout)
    projections = [n for n in dict(diffusers_unet.named_modules()) if ATTENTION_PROJECTION.fullmatch(n)]
    assert len(projections) == (2 * 2 + 2 * 10 + 10 + 3 * 2 + 3 * 10) * 2 * 4  # 70 transformer blocks
    prefixes = {kohya_prefix("unet", diffusers_to_compvis_unet(p, layout)) for p in projections}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in prefixes
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0" in prefixes
    assert len(prefixes) == len(projections)

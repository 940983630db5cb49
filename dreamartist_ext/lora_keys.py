"""Layer names for LoRA files: Stable Diffusion 1.x, 2.x and SDXL.

Three namings meet here:
- diffusers ``UNet2DConditionModel`` / transformers ``CLIPTextModel`` module paths (what we train on standalone),
- the host's ``ldm`` ``UNetModel`` module paths ("compvis" naming, what the host trains and generates with),
- kohya key prefixes (``lora_unet_<diffusers path with '_'>``), what the host's Lora extension loads.

The U-Net translation covers the transformer (attention) parts, which is where our adapters live. It is derived
from the block structure of an SD1 U-Net, described by ``UnetLayout``:

- ldm ``input_blocks``: block 0 is conv_in; then for every resolution level ``layers_per_block`` blocks of
  (ResBlock, [SpatialTransformer]) followed, except at the last level, by one Downsample block.
  So down level ``d``, layer ``a`` is ``input_blocks.{1 + d*(L+1) + a}``, its transformer at sub-index 1.
- ldm ``middle_block``: (ResBlock, SpatialTransformer, ResBlock).
- ldm ``output_blocks``: levels in reverse, ``L+1`` blocks each, (ResBlock, [SpatialTransformer], [Upsample]).
  diffusers ``up_blocks.u`` is the level ``levels-1-u``; its layer ``a`` is ``output_blocks.{u*(L+1) + a}``.

Inside a transformer both namings agree (``norm``, ``proj_in``, ``transformer_blocks.N.attn1.to_q``, ...,
``proj_out``), so that rest of the path passes through unchanged.

kohya files name SD 1.x/2.x U-Nets in the diffusers naming (``lora_unet_down_blocks_0_attentions_0_...``) and the
SDXL U-Net in the original one (``lora_unet_input_blocks_4_1_...``); SDXL's two text encoders are ``lora_te1_``
(CLIP-L) and ``lora_te2_`` (OpenCLIP-bigG), both in transformers ``CLIPTextModel`` naming.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

_KOHYA_PART_PREFIXES = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}
TEXT_PARTS = ("te", "te1", "te2")
# The host maps only these text-encoder keys (lora_te_text_model_encoder_layers_*) onto its CLIP model.
_TEXT_ENCODER_LAYERS = "text_model.encoder.layers."
_TRANSFORMER_CHILDREN = frozenset({"norm", "proj_in", "transformer_blocks", "proj_out"})


def kohya_prefix(part: str, module_path: str) -> str:
    """kohya key prefix of a module: 'unet' takes U-Net paths (in the naming the family's files use), 'te'
    (SD 1.x/2.x), 'te1' and 'te2' (SDXL) transformers CLIPTextModel paths."""
    if part not in _KOHYA_PART_PREFIXES:
        raise ValueError(f"unknown model part {part!r}: expected one of {', '.join(_KOHYA_PART_PREFIXES)}")
    if not module_path or any(not component for component in module_path.split(".")):
        raise ValueError(f"malformed module path {module_path!r}")
    if part in TEXT_PARTS and not module_path.startswith(_TEXT_ENCODER_LAYERS):
        raise ValueError(
            f"text-encoder path {module_path!r} is outside {_TEXT_ENCODER_LAYERS}*: the host's Lora loader "
            "would ignore it"
        )
    return _KOHYA_PART_PREFIXES[part] + module_path.replace(".", "_")


def sdxl_text_prefix(path: str) -> str:
    """kohya prefix of ``te1.<CLIPTextModel path>`` / ``te2.<path>``: SDXL's text encoders under one root."""
    encoder, _, rest = path.partition(".")
    if encoder not in ("te1", "te2"):
        raise ValueError(f"SDXL text-encoder path {path!r} must start with te1. or te2.")
    return kohya_prefix(encoder, rest)


def module_path_for_prefix(prefix: str, module_paths: Iterable[str]) -> str | None:
    """The module path among ``module_paths`` whose kohya prefix is ``prefix``; None if there is none.

    '_' is both the separator and part of names like 'to_q', so the prefix is matched against the known
    paths rather than split. Two known paths flattening to the same prefix is a ValueError.
    """
    for head in _KOHYA_PART_PREFIXES.values():
        if prefix.startswith(head):
            flattened = prefix[len(head):]
            break
    else:
        return None
    matches = sorted({path for path in module_paths if path.replace(".", "_") == flattened})
    if len(matches) > 1:
        raise ValueError(f"kohya prefix {prefix!r} is ambiguous: {matches}")
    return matches[0] if matches else None


@dataclass(frozen=True)
class UnetLayout:
    """Block counts of an SD1-style U-Net, enough to translate transformer paths between namings."""

    levels: int  # resolution levels: len(channel_mult) in ldm, len(block_out_channels) in diffusers
    layers_per_block: int  # ResBlocks per down level (num_res_blocks); up levels have one more
    attention_levels: frozenset[int]  # down levels (0 = full resolution) whose blocks carry a transformer
    mid_attention: bool = True

    def __post_init__(self) -> None:
        if self.levels < 1 or self.layers_per_block < 1:
            raise ValueError(f"a U-Net needs at least one level and one layer per block: {self}")
        if not set(self.attention_levels) <= set(range(self.levels)):
            raise ValueError(f"attention levels {sorted(self.attention_levels)} outside 0..{self.levels - 1}")

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> UnetLayout:
        """Layout of a diffusers UNet2DConditionModel from its ``.config``."""
        down_types: Sequence[str] = config["down_block_types"]
        up_types: Sequence[str] = config["up_block_types"]
        layers = _single_count(config["layers_per_block"], "layers_per_block")
        attention = frozenset(i for i, kind in enumerate(down_types) if "CrossAttn" in kind)
        mirrored = frozenset(len(up_types) - 1 - i for i, kind in enumerate(up_types) if "CrossAttn" in kind)
        if len(up_types) != len(down_types) or mirrored != attention:
            raise ValueError("up blocks do not mirror down blocks; not an SD1-style U-Net")
        mid_type = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
        return cls(len(down_types), layers, attention, mid_attention="CrossAttn" in mid_type)

    @classmethod
    def from_ldm_config(
        cls, channel_mult: Sequence[int], num_res_blocks: int | Sequence[int], attention_resolutions: Iterable[int]
    ) -> UnetLayout:
        """Layout of an ldm UNetModel from its config values (level ``d`` has downsampling rate 2**d)."""
        rates = set(attention_resolutions)
        levels = len(channel_mult)
        attention = frozenset(level for level in range(levels) if 2**level in rates)
        return cls(levels, _single_count(num_res_blocks, "num_res_blocks"), attention)

    def down_attentions(self) -> list[tuple[int, int]]:
        """(level, layer) of every down-path transformer, in model order."""
        return [(d, a) for d in sorted(self.attention_levels) for a in range(self.layers_per_block)]

    def up_attentions(self) -> list[tuple[int, int]]:
        """(up block, layer) of every up-path transformer, in model order."""
        return [
            (u, a)
            for u in range(self.levels)
            if self.levels - 1 - u in self.attention_levels
            for a in range(self.layers_per_block + 1)
        ]


def _single_count(value: int | Sequence[int], name: str) -> int:
    if isinstance(value, int):
        return value
    counts = set(value)
    if len(counts) != 1:
        raise ValueError(f"{name} differs between levels ({list(value)}); not supported")
    return counts.pop()


SD15_LAYOUT = UnetLayout(levels=4, layers_per_block=2, attention_levels=frozenset({0, 1, 2}))

_COMPVIS_INPUT = re.compile(r"input_blocks\.(\d+)\.1(?:\.(.+))?")
_COMPVIS_MIDDLE = re.compile(r"middle_block\.1(?:\.(.+))?")
_COMPVIS_OUTPUT = re.compile(r"output_blocks\.(\d+)\.1(?:\.(.+))?")
_DIFFUSERS_DOWN = re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)(?:\.(.+))?")
_DIFFUSERS_MID = re.compile(r"mid_block\.attentions\.0(?:\.(.+))?")
_DIFFUSERS_UP = re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)(?:\.(.+))?")


def compvis_to_diffusers_unet(path: str, layout: UnetLayout = SD15_LAYOUT) -> str:
    """ldm UNetModel module path (relative to the U-Net) -> diffusers UNet2DConditionModel path."""
    stride = layout.layers_per_block + 1
    if match := _COMPVIS_INPUT.fullmatch(path):
        block, rest = int(match[1]), match[2]
        level, layer = divmod(block - 1, stride)
        # layer == stride - 1 is the Downsample block, whose sub-index 1 does not exist
        if block >= 1 and layer < layout.layers_per_block and level in layout.attention_levels:
            return _join(f"down_blocks.{level}.attentions.{layer}", rest, path)
    elif match := _COMPVIS_MIDDLE.fullmatch(path):
        if layout.mid_attention:
            return _join("mid_block.attentions.0", match[1], path)
    elif match := _COMPVIS_OUTPUT.fullmatch(path):
        block, rest = int(match[1]), match[2]
        up_block, layer = divmod(block, stride)
        if up_block < layout.levels and layout.levels - 1 - up_block in layout.attention_levels:
            return _join(f"up_blocks.{up_block}.attentions.{layer}", rest, path)
    raise ValueError(f"{path!r} is not a transformer module of this U-Net layout ({layout})")


def diffusers_to_compvis_unet(path: str, layout: UnetLayout = SD15_LAYOUT) -> str:
    """diffusers UNet2DConditionModel module path -> ldm UNetModel path (relative to the U-Net)."""
    stride = layout.layers_per_block + 1
    if match := _DIFFUSERS_DOWN.fullmatch(path):
        level, layer, rest = int(match[1]), int(match[2]), match[3]
        if level in layout.attention_levels and layer < layout.layers_per_block:
            return _join(f"input_blocks.{1 + level * stride + layer}.1", rest, path)
    elif match := _DIFFUSERS_MID.fullmatch(path):
        if layout.mid_attention:
            return _join("middle_block.1", match[1], path)
    elif match := _DIFFUSERS_UP.fullmatch(path):
        up_block, layer, rest = int(match[1]), int(match[2]), match[3]
        if up_block < layout.levels and layout.levels - 1 - up_block in layout.attention_levels and layer < stride:
            return _join(f"output_blocks.{up_block * stride + layer}.1", rest, path)
    raise ValueError(f"{path!r} is not a transformer module of this U-Net layout ({layout})")


def _join(transformer: str, rest: str | None, original: str) -> str:
    if rest is None:
        return transformer
    if rest.split(".")[0] not in _TRANSFORMER_CHILDREN:
        raise ValueError(f"{original!r}: {rest!r} is not part of a spatial transformer")
    return f"{transformer}.{rest}"

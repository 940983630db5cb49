"""Every option of a DreamArtist training run, with the paper's defaults, validated in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .guidance import GuidanceSchedule
from .names import validate_concept_name
from .schedules import LearningRateSchedule

LATENT_SAMPLING = ("once", "deterministic", "random")
CLIP_MODES = ("none", "value", "norm")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESIZE_MODES = ("crop", "pad", "stretch")


class ConfigError(ValueError):
    pass


@dataclass
class PreviewConfig:
    prompt: str = "[name]"  # [name] is replaced by the concept name
    negative_prompt: str = ""  # "[name]-neg" is added automatically
    steps: int = 20
    guidance: float = 7.0
    seed: int = 1
    width: int = 0  # 0 = training size
    height: int = 0
    count: int = 1


@dataclass
class TrainConfig:
    name: str
    images: list[str] = field(default_factory=list)

    # the embedding pair (paper: 3 + 3 vectors, negative from the empty text plus small noise)
    init_text: str = "*"
    positive_vectors: int = 3
    negative_vectors: int = 3
    negative_noise: float = 1e-3
    use_negative: bool = True  # False = plain textual inversion: positive branch only, g = 1

    # data
    width: int = 512
    height: int = 512
    resize: str = "crop"
    template: str = "subject"
    flip: bool = False
    shuffle_tags: bool = False
    tag_dropout: float = 0.0
    latent_sampling: str = "once"
    use_alpha_weight: bool = True

    # objective
    guidance: str = "3"  # paper: 3 (5 for styles); "L-H[:linear|cos|cos2]" for a dynamic scale
    reconstruction_weight: float = 1.0  # 0 turns the pixel reconstruction loss off
    perceptual_weight: float = 0.0  # LPIPS on the reconstruction; needs AlexNet weights
    perceptual_random_trunk: bool = False  # tests only: LPIPS heads on an untrained trunk

    # optimisation
    steps: int = 3000
    embedding_lr: str = "0.0025"
    negative_lr_scale: float = 1.0
    batch_size: int = 1
    gradient_accumulation: int = 1
    clip_mode: str = "none"
    clip_value: float = 1.0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)

    # adapters (rank 0 = off)
    unet_rank: int = 4
    text_rank: int = 4
    adapter_alpha: float = 0.0  # 0 = same as the rank (scale 1)
    unet_lr: str = "1e-4"
    text_lr: str = "5e-5"
    negative_adapter_lr_scale: float = 1.0

    # runtime
    seed: int = 0
    precision: str = "auto"  # auto = bf16/fp16 autocast on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    reconstruction_scale: float = 1.0  # decode the reconstruction from a latent crop of this side fraction
    save_every: int = 500
    preview_every: int = 500
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    preview: PreviewConfig = field(default_factory=PreviewConfig)

    @property
    def uses_adapters(self) -> bool:
        return self.unet_rank > 0 or self.text_rank > 0

    @property
    def uses_reconstruction(self) -> bool:
        return self.reconstruction_weight > 0 or self.perceptual_weight > 0

    def guidance_schedule(self) -> GuidanceSchedule:
        return GuidanceSchedule.parse(self.guidance) if self.use_negative else GuidanceSchedule(1.0, 1.0)

    def validate(self, size_multiple: int = 8) -> "TrainConfig":
        """Raise ConfigError (a clear sentence) for the first bad option; returns self."""
        try:
            validate_concept_name(self.name)
            GuidanceSchedule.parse(self.guidance)
            for label, text in (("embedding", self.embedding_lr), ("U-Net adapter", self.unet_lr),
                                ("text adapter", self.text_lr)):
                try:
                    LearningRateSchedule.parse(text)
                except ValueError as error:
                    raise ConfigError(f"{label} learning rate: {error}") from None
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if not isinstance(self.preview, PreviewConfig):
            raise ConfigError("option 'preview' must be an object of preview settings")
        checks = [
            (len(self.adam_betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                               for b in self.adam_betas), "adam_betas must be two numbers in [0, 1)"),
            (1 <= self.positive_vectors <= 75, "positive vectors must be between 1 and 75"),
            (1 <= self.negative_vectors <= 75, "negative vectors must be between 1 and 75"),
            (self.negative_noise >= 0, "negative init noise must be >= 0"),
            (self.steps >= 1, "steps must be at least 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.gradient_accumulation >= 1, "gradient accumulation must be at least 1"),
            (self.width > 0 and self.width % size_multiple == 0,
             f"width {self.width} must be a positive multiple of {size_multiple} for this model"),
            (self.height > 0 and self.height % size_multiple == 0,
             f"height {self.height} must be a positive multiple of {size_multiple} for this model"),
            (self.resize in RESIZE_MODES, f"resize must be one of {', '.join(RESIZE_MODES)}"),
            (self.latent_sampling in LATENT_SAMPLING, f"latent sampling must be one of {', '.join(LATENT_SAMPLING)}"),
            (self.clip_mode in CLIP_MODES, f"gradient clipping must be one of {', '.join(CLIP_MODES)}"),
            (self.clip_mode == "none" or self.clip_value > 0, "gradient clipping value must be > 0"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (0 <= self.tag_dropout <= 1, "tag dropout must be between 0 and 1"),
            (self.reconstruction_weight >= 0, "reconstruction weight must be >= 0"),
            (self.perceptual_weight >= 0, "LPIPS weight must be >= 0"),
            (0 < self.reconstruction_scale <= 1, "reconstruction crop must be in (0, 1]"),
            (self.negative_lr_scale >= 0 and self.negative_adapter_lr_scale >= 0, "lr scales must be >= 0"),
            (self.unet_rank >= 0 and self.text_rank >= 0, "adapter ranks must be >= 0"),
            (self.adapter_alpha >= 0, "adapter alpha must be >= 0"),
            (self.save_every >= 0 and self.preview_every >= 0, "save/preview intervals must be >= 0"),
            (self.max_bad_steps >= 1, "max bad steps must be at least 1"),
            (self.weight_decay >= 0, "weight decay must be >= 0"),
            (self.preview.steps >= 1 and self.preview.count >= 1, "preview steps and count must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from JSON-like values; unknown keys are an error (a typo must not silently do nothing)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(unknown)}")
        values = dict(values)
        if isinstance(values.get("preview"), dict):
            preview_known = {f.name for f in dataclasses.fields(PreviewConfig)}
            bad = sorted(set(values["preview"]) - preview_known)
            if bad:
                raise ConfigError(f"unknown preview option(s): {', '.join(bad)}")
            values["preview"] = PreviewConfig(**values["preview"])
        if "adam_betas" in values:
            if not isinstance(values["adam_betas"], (list, tuple)):
                raise ConfigError("adam_betas must be two numbers in [0, 1)")
            values["adam_betas"] = tuple(values["adam_betas"])
        _check_types(cls, values)
        if isinstance(values.get("preview"), PreviewConfig):
            _check_types(PreviewConfig, dataclasses.asdict(values["preview"]))
        try:
            return cls(**values)
        except TypeError as error:
            raise ConfigError(str(error)) from None

    def hyperparameters(self) -> dict[str, Any]:
        """What goes into file metadata: the options that shape the result (no paths)."""
        out = self.to_dict()
        out.pop("images", None)
        out.pop("preview", None)
        return out


_SCALAR_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
_TYPE_WORDS = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false"}


def _check_types(cls, values: dict[str, Any]) -> None:
    """JSON from the API or a file must carry the right types: '3' for steps is an error, not a crash later."""
    for f in dataclasses.fields(cls):
        expected = _SCALAR_TYPES.get(str(f.type))
        if expected is None or f.name not in values:
            continue
        value = values[f.name]
        wrong_bool = isinstance(value, bool) and f.type != "bool"
        if wrong_bool or not isinstance(value, expected):
            raise ConfigError(f"option {f.name!r} must be {_TYPE_WORDS[str(f.type)]}, got {value!r}")
        if f.type == "float":
            values[f.name] = float(value)

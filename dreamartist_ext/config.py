"""Every option of a DreamArtist training run, with the paper's defaults, validated in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput
from .guidance import GuidanceSchedule
from .names import validate_concept_name
from .schedules import LearningRateSchedule

LATENT_SAMPLING = ("once", "deterministic", "random")
CLIP_MODES = ("none", "value", "norm")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESIZE_MODES = ("crop", "pad", "stretch", "bucket")  # how images are fitted to the training size


class ConfigError(InvalidInput):
    """An option value that cannot be used."""


# Training sizes: SD 1.x was trained at 512 px; the trainer's memory grows with the pixels of a micro-batch
# (measured on CPU: 512 px + reconstruction 14.2 GB). A side over 4096 px or more than 4 megapixels (2048x2048,
# or e.g. 4096x1024) is a typo rather than a plan, and would hang or run out of memory at the first step.
MAX_SIDE = 4096
MAX_PIXELS = 2048 * 2048
MAX_BATCH_PIXELS = 64 * 512 * 512  # one micro-batch: at most 64 images of 512x512; accumulate for more
MAX_BATCH_SIZE = 64
MAX_GRADIENT_ACCUMULATION = 1024
MAX_PREVIEW_COUNT = 16


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
           choices: tuple[str, ...] | None = None, hidden: bool = False) -> Any:
    """A config field with its help text (the one copy the CLI help and the WebUI tab's info text read)."""
    metadata = {"help": help, "choices": choices, "hidden": hidden}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def option_help(cls: type, name: str) -> str:
    """The help text of config field ``name`` of ``cls`` (TrainConfig or PreviewConfig)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[name]


@dataclass
class PreviewConfig:
    prompt: str = option("[name]", "preview prompt; [name] is replaced by the concept name")
    negative_prompt: str = option("", "preview negative prompt; [name]-neg is added automatically")
    steps: int = option(20, "sampling steps of each preview")
    guidance: float = option(7.0, "CFG scale of the previews")
    seed: int = option(1, "seed of the previews (the same seed every time, so previews are comparable)")
    width: int = option(0, "preview width in pixels (0 = training width)")
    height: int = option(0, "preview height in pixels (0 = training height)")
    count: int = option(1, f"images per preview (at most {MAX_PREVIEW_COUNT})")


@dataclass
class TrainConfig:
    name: str = option(dataclasses.MISSING, "concept name: the prompt word (its partner NAME-neg is made "
                                            "automatically)")
    images: list[str] = option(help="training images or folders", factory=list)

    # the embedding pair (paper: 3 + 3 vectors, negative from the empty text plus small noise)
    init_text: str = option("*", "words to start the positive embedding from, e.g. 'girl' ('*' = no hint)")
    positive_vectors: int = option(3, "vectors in the positive embedding (paper: 3)")
    negative_vectors: int = option(3, "vectors in the negative embedding (paper: 3; the original extension used 6)")
    negative_noise: float = option(1e-3, "std of the noise added to the empty-text start of the negative embedding")
    use_negative: bool = option(True, "learn the negative embedding (off = plain textual inversion, g = 1)")

    # data
    width: int = option(0, f"training width in pixels (a multiple of 8, at most {MAX_SIDE}; 0 = the model's native "
                           "size: 512 SD 1.x and SD 2.x base, 768 SD 2.x-v, 1024 SDXL)")
    height: int = option(0, f"training height in pixels (a multiple of 8, at most {MAX_SIDE}; 0 = the model's "
                            "native size)")
    resize: str = option("crop", "how images are fitted to the training size (bucket: keep each image's aspect "
                                 "ratio at about the training size's area, as SDXL was trained)",
                         choices=RESIZE_MODES)
    template: str = option("subject", "prompt template: a shipped name (subject, style, subject_filewords, "
                                      "style_filewords, none) or a .txt file")
    flip: bool = option(False, "also train on the mirrored image")
    shuffle_tags: bool = option(False, "shuffle the comma-separated tags of [filewords]")
    tag_dropout: float = option(0.0, "probability of dropping each [filewords] tag")
    latent_sampling: str = option("once", "once (sample the VAE once), deterministic (its mean) or random (every "
                                          "step)", choices=LATENT_SAMPLING)
    use_alpha_weight: bool = option(True, "weight the loss by the image's alpha channel / <image>_att mask")

    # objective
    guidance: str = option("3", "guidance scale g of the combined loss (paper: 3, 5 for styles); "
                                "'L-H[:linear|cos|cos2]' = dynamic over the timestep, e.g. '1-5:cos'")
    reconstruction_weight: float = option(1.0, "weight of the pixel reconstruction loss (0 = off)")
    perceptual_weight: float = option(0.0, "weight of an LPIPS term on the reconstruction (needs AlexNet weights)")
    perceptual_random_trunk: bool = option(False, "LPIPS heads on an untrained trunk (tests only)", hidden=True)

    # optimisation
    steps: int = option(3000, "optimizer steps")
    embedding_lr: str = option("0.0025", "embedding learning rate, or a schedule like '0.005:100, 1e-3:1000, "
                                         "1e-5' (rate:until step; paper: 0.0025)")
    negative_lr_scale: float = option(1.0, "multiplier on the negative embedding's learning rate")
    batch_size: int = option(1, f"images per micro-batch (at most {MAX_BATCH_SIZE})")
    gradient_accumulation: int = option(1, f"micro-batches per optimizer step (at most {MAX_GRADIENT_ACCUMULATION})")
    clip_mode: str = option("none", "gradient clipping", choices=CLIP_MODES)
    clip_value: float = option(1.0, "gradient clipping threshold")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")

    # adapters (rank 0 = off)
    unet_rank: int = option(4, "rank of the U-Net adapters (0 = no U-Net adapters)")
    text_rank: int = option(4, "rank of the text-encoder adapters (0 = no text adapters)")
    adapter_alpha: float = option(0.0, "LoRA alpha (0 = same as the rank)")
    unet_lr: str = option("1e-4", "U-Net adapter learning rate or schedule")
    text_lr: str = option("5e-5", "text-encoder adapter learning rate or schedule")
    negative_adapter_lr_scale: float = option(1.0, "multiplier on the negative adapters' learning rate")

    # runtime
    seed: int = option(0, "seed of everything random in the run")
    precision: str = option("auto", "auto = bf16/fp16 autocast on a GPU, fp32 on the CPU", choices=PRECISIONS)
    gradient_checkpointing: bool = option(False, "trade compute for memory in the U-Net (the VAE decoder is "
                                                 "always checkpointed for the reconstruction loss)")
    reconstruction_scale: float = option(1.0, "decode the reconstruction from a random latent crop of this side "
                                              "fraction (1 = whole; less memory)")
    save_every: int = option(500, "save the pair and a checkpoint every N steps (0 = only at the end)")
    preview_every: int = option(500, "make previews every N steps (0 = only at the end)")
    max_bad_steps: int = option(5, "stop after this many non-finite steps in a row")
    preview: PreviewConfig = option(help="preview settings", factory=PreviewConfig)

    @property
    def uses_adapters(self) -> bool:
        return self.unet_rank > 0 or self.text_rank > 0

    @property
    def uses_reconstruction(self) -> bool:
        return self.reconstruction_weight > 0 or self.perceptual_weight > 0

    def guidance_schedule(self) -> GuidanceSchedule:
        return GuidanceSchedule.parse(self.guidance) if self.use_negative else GuidanceSchedule(1.0, 1.0)

    def sized_for(self, native_size: int) -> "TrainConfig":
        """This config with a width or height of 0 replaced by the model's native side length."""
        return dataclasses.replace(self, width=self.width or native_size, height=self.height or native_size)

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
            (1 <= self.batch_size <= MAX_BATCH_SIZE, f"batch size must be between 1 and {MAX_BATCH_SIZE}"),
            (1 <= self.gradient_accumulation <= MAX_GRADIENT_ACCUMULATION,
             f"gradient accumulation must be between 1 and {MAX_GRADIENT_ACCUMULATION}"),
            # 0 = the model's native size; prepare_run resolves it (sized_for) and validates the result
            (self.width >= 0 and self.width % size_multiple == 0,
             f"width {self.width} must be a positive multiple of {size_multiple} for this model (or 0 for the "
             "model's native size)"),
            (self.height >= 0 and self.height % size_multiple == 0,
             f"height {self.height} must be a positive multiple of {size_multiple} for this model (or 0 for the "
             "model's native size)"),
            (self.width <= MAX_SIDE and self.height <= MAX_SIDE,
             f"training size {self.width}x{self.height} is too large: each side may be at most {MAX_SIDE} px"),
            (self.width * self.height <= MAX_PIXELS,
             f"training size {self.width}x{self.height} is {self.width * self.height / 1e6:.1f} megapixels; at most "
             f"{MAX_PIXELS / 1e6:.1f} (e.g. 2048x2048) are supported"),
            (self.batch_size * self.width * self.height <= MAX_BATCH_PIXELS,
             f"batch size {self.batch_size} at {self.width}x{self.height} is too much for one micro-batch (at most "
             f"{MAX_BATCH_PIXELS // (512 * 512)} images of 512x512); use gradient accumulation instead"),
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
            (self.preview.steps >= 1, "preview steps must be at least 1"),
            (1 <= self.preview.count <= MAX_PREVIEW_COUNT, f"preview count must be between 1 and {MAX_PREVIEW_COUNT}"),
            (all(side == 0 or (side % size_multiple == 0 and 64 <= side <= MAX_SIDE)
                 for side in (self.preview.width, self.preview.height)),
             f"preview width and height must be 0 (the training size) or a multiple of {size_multiple} between 64 "
             f"and {MAX_SIDE}"),
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

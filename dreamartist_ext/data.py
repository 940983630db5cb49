"""Training data for DreamArtist: reference images (+ optional masks and captions) and prompt templates.

Everything here is CPU-only and independent of the WebUI, so it can be unit-tested and reused by the CLI.

Loading is all-or-nothing: every file is validated and converted before anything is returned, and a bad
input raises ImageInputError naming every offending file, so a training run never starts on a partial set.
PIL's global state (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS) is read, never changed.
"""

from __future__ import annotations

import math
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import RESIZE_MODES
from .errors import InvalidInput

__all__ = [
    "ImageInputError",
    "TrainImage",
    "IMAGE_EXTENSIONS",
    "MIN_SIDE",
    "MAX_PIXELS",
    "RESIZE_MODES",
    "collect_image_paths",
    "load_training_images",
    "find_mask_path",
    "read_caption",
    "BUILTIN_TEMPLATES",
    "builtin_template_dir",
    "resolve_template",
    "load_templates",
    "render_prompt",
]

PathLike = Union[str, "os.PathLike[str]"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
MIN_SIDE: int = 64
MAX_PIXELS: int = 50_000_000

MASK_SUFFIX = "_att"
# When several masks exist for one image, lossless formats win.
_MASK_EXTENSION_PREFERENCE = (".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".jpg", ".jpeg")

# Modes whose channels PIL converts to RGB correctly. LAB, for instance, is deliberately absent:
# PIL "converts" it by copying channels, which gives wrong colours.
_OPAQUE_COLOUR_MODES = frozenset({"L", "RGB", "RGBX", "CMYK", "YCbCr", "HSV"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_HIGH_DEPTH_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_MODES_WITH_COLOUR_KEY = frozenset({"L", "RGB", "P"})  # info["transparency"] marks see-through pixels

# Errors PIL raises while decoding broken data (besides OSError for truncation).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


class ImageInputError(InvalidInput):
    """Raised for unusable training images; str() lists every offending file with its reason (one per line)."""

    problems: list[tuple[Path, str]]

    def __init__(self, problems: Sequence[tuple[Path, str]]):
        self.problems = [(Path(path), reason) for path, reason in problems]
        super().__init__("\n".join(f"{path}: {reason}" for path, reason in self.problems))

    def __reduce__(self):  # keep it picklable despite the custom __init__
        return (type(self), (self.problems,))


@dataclass
class TrainImage:
    path: Path
    pixels: torch.Tensor  # float32 [3, H, W] in [-1, 1], resized+cropped to the training size
    weight: torch.Tensor | None  # float32 [1, H, W] in [0, 1] from alpha and/or mask file; None = uniform
    caption: str  # text of <image>.txt next to the image ('' if none), stripped


class _Rejected(Exception):
    """Internal: one file cannot be used; the message is a reason phrase such as 'is empty (0 bytes)'."""


# --------------------------------------------------------------------------------------------------------
# Finding files


def _as_source_list(sources: Sequence[PathLike] | PathLike) -> list[PathLike]:
    # A bare string is a Sequence too; iterating it would treat every character as a path.
    if isinstance(sources, (str, os.PathLike)):
        return [sources]
    return list(sources)


def _is_mask_file(path: Path) -> bool:
    return path.stem.endswith(MASK_SUFFIX)


def collect_image_paths(sources: Sequence[PathLike]) -> list[Path]:
    """Files and/or folders (folders: non-recursive, image extensions only, sorted, skipping mask files `*_att.*`
    and hidden files). Missing path -> ImageInputError naming it. No images found -> ImageInputError saying so."""
    source_paths = [Path(source).expanduser() for source in _as_source_list(sources)]
    if not source_paths:
        raise ImageInputError([(Path("."), "no training images were given")])

    problems: list[tuple[Path, str]] = []
    found: list[Path] = []
    for source in source_paths:
        if source.is_dir():
            found.extend(
                entry
                for entry in sorted(source.iterdir(), key=lambda p: p.name)
                if entry.suffix.lower() in IMAGE_EXTENSIONS
                and not entry.name.startswith(".")
                and not _is_mask_file(entry)
                and entry.is_file()
            )
        elif source.is_file():
            found.append(source)  # named explicitly: taken whatever its extension; decoding will judge it
        else:
            problems.append((source, "does not exist"))
    if problems:
        raise ImageInputError(problems)

    unique: list[Path] = []
    seen: set[Path] = set()
    for path in found:  # the same file named twice (directly and via its folder) is trained on once
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    if not unique:
        wanted = " ".join(sorted(IMAGE_EXTENSIONS))
        raise ImageInputError([(source, f"contains no training images (looked for {wanted})") for source in source_paths])
    return unique


def find_mask_path(image_path: Path) -> Path | None:
    """`<stem>_att.<any image ext>` beside the image, or None."""
    image_path = Path(image_path)
    for extension in _MASK_EXTENSION_PREFERENCE:
        for spelled in (extension, extension.upper()):
            candidate = image_path.with_name(f"{image_path.stem}{MASK_SUFFIX}{spelled}")
            if candidate.is_file():
                return candidate
    return None


def read_caption(image_path: Path) -> str:
    """`<stem>.txt` beside the image, UTF-8 (with BOM tolerated), stripped; '' if absent.

    Raises ValueError naming the caption file if it is not UTF-8 text."""
    caption_path = Path(image_path).with_suffix(".txt")
    if not caption_path.is_file():
        return ""
    try:
        return caption_path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise InvalidInput(
            f"{caption_path}: caption is not UTF-8 text ({error.reason} at byte {error.start})") from None


# --------------------------------------------------------------------------------------------------------
# Decoding one file


def _check_dimensions(width: int, height: int, *, enforce_min_side: bool) -> None:
    if width * height > MAX_PIXELS:
        raise _Rejected(
            f"is too large: {width}x{height} px ({width * height / 1e6:.1f} megapixels); at most "
            f"{MAX_PIXELS / 1e6:g} megapixels are supported, downscale it first"
        )
    if enforce_min_side and min(width, height) < MIN_SIDE:
        raise _Rejected(f"is {width}x{height} px; at least {MIN_SIDE} px on each side is needed")


def _decode_first_frame(path: Path, *, enforce_min_side: bool) -> Image.Image:
    """Opens one file, checks its header size, decodes its first frame and applies EXIF orientation."""
    try:
        byte_count = path.stat().st_size
    except FileNotFoundError:
        raise _Rejected("does not exist") from None
    except OSError as error:
        raise _Rejected(f"cannot be read ({error.strerror or error})") from None
    if not path.is_file():
        raise _Rejected("is not a file")
    if byte_count == 0:
        raise _Rejected("is empty (0 bytes)")

    with warnings.catch_warnings():
        # Oversized images are rejected below with a clearer message than PIL's warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.UnidentifiedImageError:
            raise _Rejected("is not an image (its content is not a format PIL can read)") from None
        except Image.DecompressionBombError as error:
            raise _Rejected(f"is too large to decode safely ({error})") from None
        except _DECODE_ERRORS as error:
            raise _Rejected(f"cannot be opened as an image ({error})") from None

    with image:
        # The size comes from the header; nothing has been decoded yet.
        _check_dimensions(*image.size, enforce_min_side=enforce_min_side)
        try:
            image.load()  # first frame of an animation; raises on truncated data
        except Image.DecompressionBombError as error:
            raise _Rejected(f"is too large to decode safely ({error})") from None
        except _DECODE_ERRORS as error:
            raise _Rejected(f"is truncated or corrupt ({error})") from None
        try:
            return ImageOps.exif_transpose(image)
        except Exception as error:  # malformed EXIF: orientation unknown, so the pixels cannot be trusted
            raise _Rejected(f"has unreadable EXIF orientation data ({error})") from None


def _high_depth_grey_to_uint8(image: Image.Image) -> np.ndarray:
    """16/32-bit integer greyscale is scaled (65535 -> 255); float 'F' is on PIL's 0..255 scale and clipped."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        values = values * (255.0 / 65535.0)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _split_colour_and_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (uint8 [H, W, 3] RGB composited over white, float32 [H, W] alpha in [0, 1] or None if opaque)."""
    mode = image.mode
    if mode in _HIGH_DEPTH_GREY_MODES:
        grey = _high_depth_grey_to_uint8(image)
        return np.repeat(grey[:, :, None], 3, axis=2), None
    if mode == "1":
        image = image.convert("L")
        mode = "L"

    has_alpha = (
        mode in _ALPHA_MODES
        or (mode in _MODES_WITH_COLOUR_KEY and "transparency" in image.info)
        or (mode == "P" and image.palette is not None and image.palette.mode == "RGBA")
    )
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3] / 255.0
        if alpha.max() == 0.0:
            raise _Rejected("is fully transparent (alpha is 0 everywhere), so there is nothing to learn from")
        over_white = rgba[:, :, :3] * alpha[:, :, None] + 255.0 * (1.0 - alpha[:, :, None])
        rgb = np.clip(np.rint(over_white), 0, 255).astype(np.uint8)
        return rgb, (None if alpha.min() == 1.0 else alpha)
    if mode in _OPAQUE_COLOUR_MODES or mode == "P":
        return np.asarray(image.convert("RGB")), None
    raise _Rejected(f"has colour mode {mode!r}, which is not supported (save it as RGB first)")


def _mask_to_unit_float(mask: Image.Image) -> np.ndarray:
    if mask.mode in _HIGH_DEPTH_GREY_MODES:
        grey = _high_depth_grey_to_uint8(mask)
    else:
        grey = np.asarray(mask.convert("L"))
    return grey.astype(np.float32) / 255.0


def _load_mask(mask_path: Path, image_size: tuple[int, int]) -> np.ndarray:
    """The mask as float32 [H, W] in [0, 1] at the (oriented) image's size."""
    try:
        mask = _decode_first_frame(mask_path, enforce_min_side=False)
    except _Rejected as rejection:
        raise _Rejected(f"its mask {mask_path} {rejection}") from None
    image_width, image_height = image_size
    mask_width, mask_height = mask.size
    # A mask at another resolution is fine; another aspect ratio means it belongs to a different picture.
    expected_mask_height = mask_width * image_height / image_width
    if abs(mask_height - expected_mask_height) > max(1.0, 0.01 * expected_mask_height):
        raise _Rejected(
            f"its mask {mask_path} is {mask_width}x{mask_height} px, which does not match the image's "
            f"{image_width}x{image_height} px aspect ratio"
        )
    values = _mask_to_unit_float(mask)
    if mask.size != image_size:
        values = np.asarray(Image.fromarray(values, mode="F").resize(image_size, Image.Resampling.BILINEAR))
    if values.max() == 0.0:
        raise _Rejected(f"its mask {mask_path} is black everywhere, so no pixel would be learned")
    return np.clip(values, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------
# Geometry


def _crop_box(source_width: int, source_height: int, width: int, height: int) -> tuple[float, float, float, float]:
    """The centred source region with the target's aspect ratio (sub-pixel exact, so pixels and weights agree)."""
    if source_width * height > source_height * width:  # source is wider than the target
        crop_width = source_height * width / height
        left = (source_width - crop_width) / 2
        return (left, 0.0, left + crop_width, float(source_height))
    crop_height = source_width * height / width
    top = (source_height - crop_height) / 2
    return (0.0, top, float(source_width), top + crop_height)


def _padded_fit(source_width: int, source_height: int, width: int, height: int) -> tuple[int, int, int, int]:
    """-> (fitted width, fitted height, left, top) for fitting inside the target without cropping."""
    scale = min(width / source_width, height / source_height)
    fitted_width = min(width, max(1, round(source_width * scale)))
    fitted_height = min(height, max(1, round(source_height * scale)))
    return fitted_width, fitted_height, (width - fitted_width) // 2, (height - fitted_height) // 2


def _to_training_size(
    image: Image.Image, width: int, height: int, resize: str, resample: Image.Resampling, background
) -> Image.Image:
    if resize == "stretch":
        return image.resize((width, height), resample)
    if resize == "crop":
        return image.resize((width, height), resample, box=_crop_box(*image.size, width, height))
    fitted_width, fitted_height, left, top = _padded_fit(*image.size, width, height)
    canvas = Image.new(image.mode, (width, height), background)
    canvas.paste(image.resize((fitted_width, fitted_height), resample), (left, top))
    return canvas


MAX_BUCKET_ASPECT = 4.0


def bucket_size(source_width: int, source_height: int, width: int, height: int, multiple: int) -> tuple[int, int]:
    """The (width, height) of an aspect-ratio bucket: the source's aspect ratio, sides multiples of ``multiple``,
    area at most ``width * height`` (so memory stays what the training size promises). Aspect ratios beyond 4:1
    are cropped to 4:1."""
    area, aspect = width * height, min(max(source_width / source_height, 1 / MAX_BUCKET_ASPECT), MAX_BUCKET_ASPECT)
    bucket_width = max(multiple, round(math.sqrt(area * aspect) / multiple) * multiple)
    bucket_height = max(multiple, round(math.sqrt(area / aspect) / multiple) * multiple)
    while bucket_width * bucket_height > area:  # trim the side whose trimming keeps the aspect ratio best
        narrower = (bucket_width - multiple, bucket_height)
        lower = (bucket_width, bucket_height - multiple)
        candidates = [c for c in (narrower, lower) if min(c) >= multiple]
        if not candidates:
            break
        bucket_width, bucket_height = min(candidates, key=lambda c: abs(math.log(c[0] / c[1] / aspect)))
    return bucket_width, bucket_height


def _prepare_image(path: Path, width: int, height: int, resize: str, multiple: int = 8) -> TrainImage:
    image = _decode_first_frame(path, enforce_min_side=True)
    rgb, alpha = _split_colour_and_alpha(image)
    source_size = image.size
    if resize == "bucket":
        width, height = bucket_size(*source_size, width, height, multiple)
        resize = "crop"  # the bucket has the image's aspect ratio up to rounding: crop the rounding away

    weight = alpha
    mask_path = find_mask_path(path)
    if mask_path is not None:
        mask = _load_mask(mask_path, source_size)
        weight = mask if alpha is None else alpha * mask
        if weight.max() == 0.0:
            raise _Rejected(f"its alpha channel and its mask {mask_path} together leave no visible pixel")

    pixels_image = _to_training_size(
        Image.fromarray(rgb, mode="RGB"), width, height, resize, Image.Resampling.LANCZOS, (255, 255, 255)
    )
    pixels = torch.from_numpy(np.asarray(pixels_image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()

    padding_added = resize == "pad" and _padded_fit(*source_size, width, height)[:2] != (width, height)
    if weight is None and padding_added:
        weight = np.ones((source_size[1], source_size[0]), dtype=np.float32)  # so the padding can get weight 0
    weight_tensor = None
    if weight is not None:
        weight_image = _to_training_size(
            Image.fromarray(weight.astype(np.float32), mode="F"), width, height, resize, Image.Resampling.BILINEAR, 0.0
        )
        weight_values = np.clip(np.asarray(weight_image, dtype=np.float32), 0.0, 1.0)
        if weight_values.max() == 0.0:
            raise _Rejected(f"has no visible pixel left after resizing to {width}x{height} ({resize})")
        weight_tensor = torch.from_numpy(weight_values.copy())[None]

    try:
        caption = read_caption(path)
    except (ValueError, OSError) as error:
        raise _Rejected(f"has an unreadable caption file ({error})") from None
    return TrainImage(path=path, pixels=pixels, weight=weight_tensor, caption=caption)


def _check_training_size(value, label: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value % 8:
        raise InvalidInput(f"{label} must be a positive multiple of 8 (the VAE downsamples by 8), got {value!r}")


def load_training_images(
    sources: Sequence[PathLike], width: int, height: int, *, resize: str = "crop", multiple: int = 8
) -> list[TrainImage]:
    """All-or-nothing: validates and converts EVERY file first; if any is bad raises ImageInputError listing all
    bad files (nothing returned).

    resize: 'crop' (scale the shorter side to fit then center-crop), 'pad' (fit inside, pad with white; the
    padded area gets weight 0), 'stretch' or 'bucket' (each image at its own aspect ratio, see :func:`bucket_size`;
    ``multiple`` is the model's size multiple). width/height must be positive multiples of 8 (ValueError otherwise).
    Fully opaque images without a mask get weight None (uniform)."""
    _check_training_size(width, "width")
    _check_training_size(height, "height")
    if resize not in RESIZE_MODES:
        raise InvalidInput(f"resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
    width, height = int(width), int(height)

    prepared: list[TrainImage] = []
    problems: list[tuple[Path, str]] = []
    for path in collect_image_paths(sources):
        try:
            prepared.append(_prepare_image(path, width, height, resize, multiple))
        except _Rejected as rejection:
            problems.append((path, str(rejection)))
        except MemoryError:
            problems.append((path, "is too large to decode with the memory available"))
    if problems:
        raise ImageInputError(problems)
    return prepared


# --------------------------------------------------------------------------------------------------------
# Prompt templates

BUILTIN_TEMPLATES: tuple[str, ...] = ("subject", "subject_filewords", "style", "style_filewords", "none")

_PLACEHOLDER = re.compile(r"\[(name|filewords)\]")


def builtin_template_dir() -> Path:
    return Path(__file__).resolve().parent / "templates"


def _template_names_in(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(
        Path(file_name).stem
        for _, _, file_names in os.walk(directory)
        for file_name in file_names
        if file_name.lower().endswith(".txt")
    )


def _find_template_in(directory: Path, file_name: str) -> Path | None:
    direct = directory / file_name
    if direct.is_file():
        return direct
    # The host lists its templates folder recursively, so a name may live in a sub-folder.
    for root, dir_names, file_names in os.walk(directory):
        dir_names.sort()
        if file_name in file_names:
            return Path(root) / file_name
    return None


def resolve_template(name_or_path: str, extra_dirs: Sequence[Path] = ()) -> Path:
    """A builtin name, a name found as <name>.txt in one of extra_dirs (the host's textual_inversion_templates
    folder is passed here), or a file path. Names may be given with or without '.txt'; builtin names win.
    Unknown -> ValueError listing the available names."""
    text = str(name_or_path).strip()
    if not text:
        raise InvalidInput("no prompt template given")
    is_plain_name = not any(separator in text for separator in ("/", "\\", os.sep))
    if is_plain_name:
        name = text[: -len(".txt")] if text.lower().endswith(".txt") else text
        if name in BUILTIN_TEMPLATES:
            return builtin_template_dir() / f"{name}.txt"
        for directory in extra_dirs:
            found = _find_template_in(Path(directory), f"{name}.txt")
            if found is not None:
                return found
    candidate = Path(text).expanduser()
    if candidate.is_file():
        return candidate

    available = list(BUILTIN_TEMPLATES)
    for directory in extra_dirs:
        available += [name for name in _template_names_in(Path(directory)) if name not in available]
    raise InvalidInput(
        f"unknown prompt template {text!r}; available: {', '.join(available)} (or give the path of a .txt file)"
    )


def load_templates(path: Path) -> list[str]:
    """Non-empty, stripped lines. Every line must contain [name]; otherwise ValueError naming the file and the
    line numbers. Empty file -> ValueError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidInput(f"{path}: template is not UTF-8 text ({error.reason} at byte {error.start})") from None
    lines: list[str] = []
    missing_name: list[str] = []
    for line_number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line:
            continue
        if "[name]" not in line:
            missing_name.append(f"line {line_number}: {line!r}")
        lines.append(line)
    if missing_name:
        raise InvalidInput(
            f"{path}: every template line needs the [name] placeholder (where the learned word goes); missing on "
            + "; ".join(missing_name)
        )
    if not lines:
        raise InvalidInput(f"{path}: template file has no prompt lines")
    return lines


def _tidy_after_empty_filewords(prompt: str) -> str:
    # "a photo of [name], [filewords]" with no caption would otherwise end in a dangling comma.
    prompt = re.sub(r"\s+", " ", prompt)
    prompt = re.sub(r"\s+,", ",", prompt)
    prompt = re.sub(r",(\s*,)+", ",", prompt)
    return prompt.strip(" ,")


def render_prompt(
    template: str,
    name: str,
    caption: str = "",
    *,
    shuffle_tags: bool = False,
    tag_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> str:
    """Replaces [name] with name and [filewords] with the caption.

    Captions are comma-separated tags: shuffle_tags shuffles them, tag_dropout drops each tag with that
    probability. Randomness comes ONLY from `generator` (torch's default generator if None), so a run is
    reproducible and resumable bit-exactly; without shuffle/dropout the caption is used verbatim."""
    if not 0.0 <= tag_dropout <= 1.0:
        raise ValueError(f"tag_dropout must be between 0 and 1, got {tag_dropout!r}")
    filewords = caption.strip()
    if shuffle_tags or tag_dropout > 0.0:
        tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
        device = generator.device if generator is not None else torch.device("cpu")
        if tag_dropout > 0.0 and tags:
            keep = (torch.rand(len(tags), generator=generator, device=device) >= tag_dropout).tolist()
            tags = [tag for tag, kept in zip(tags, keep) if kept]
        if shuffle_tags and len(tags) > 1:
            order = torch.randperm(len(tags), generator=generator, device=device).tolist()
            tags = [tags[index] for index in order]
        filewords = ", ".join(tags)

    # One pass, so a caption that happens to contain "[name]" is not substituted again.
    prompt = _PLACEHOLDER.sub(lambda match: name if match.group(1) == "name" else filewords, template)
    if not filewords and "[filewords]" in template:
        prompt = _tidy_after_empty_filewords(prompt)
    return prompt

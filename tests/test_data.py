"""Tests for dreamartist_ext.data: every image is a real file written into tmp_path."""

from __future__ import annotations

import importlib.util
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features

from dreamartist_ext.data import (
    BUILTIN_TEMPLATES,
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    MIN_SIDE,
    ImageInputError,
    builtin_template_dir,
    collect_image_paths,
    find_mask_path,
    load_templates,
    load_training_images,
    read_caption,
    render_prompt,
    resolve_template,
)

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
ASSETS = Path(__file__).resolve().parents[1] / "dreamartist_ext" / "assets"


# ---------------------------------------------------------------------------------------------------------
# helpers


def as_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8, the inverse of the loader's normalisation."""
    return ((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)


def load_one(path: Path, width: int = 64, height: int = 64, **options):
    images = load_training_images([path], width, height, **options)
    assert len(images) == 1
    return images[0]


def halves(size: tuple[int, int], left_colour, right_colour, mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, size, left_colour)
    image.paste(right_colour, (size[0] // 2, 0, size[0], size[1]))
    return image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_header_only(path: Path, width: int, height: int) -> Path:
    """A greyscale PNG whose header claims width x height but whose pixel data holds one row.

    Decoding it would fail as truncated, so a 'too large' answer proves the size was checked from the header."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    one_row = zlib.compress(b"\x00" * (width + 1))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", one_row) + png_chunk(b"IEND", b"")
    )
    return path


def noise_image(size=(128, 128), seed=0) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(values, "RGB")


def assert_single_problem(error: ImageInputError, path: Path, phrase: str) -> None:
    assert [problem_path for problem_path, _ in error.problems] == [path]
    message = str(error)
    assert str(path) in message
    assert phrase in message


# ---------------------------------------------------------------------------------------------------------
# good images and conversions


def test_rgb_png_at_training_size_is_exact(tmp_path):
    values = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "plain.png"
    Image.fromarray(values, "RGB").save(path)

    image = load_one(path)

    assert image.path == path
    assert image.pixels.dtype == torch.float32 and image.pixels.shape == (3, 64, 64)
    expected = torch.from_numpy(values.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    torch.testing.assert_close(image.pixels, expected)
    assert image.weight is None  # opaque, no mask: uniform
    assert image.caption == ""


def test_crop_keeps_the_centre(tmp_path):
    # 128x64: red | green green | blue; a 64x64 centre crop sees only green.
    source = Image.new("RGB", (128, 64), GREEN)
    source.paste(RED, (0, 0, 32, 64))
    source.paste(BLUE, (96, 0, 128, 64))
    path = tmp_path / "wide.png"
    source.save(path)

    pixels = as_uint8(load_one(path, resize="crop").pixels)

    assert pixels.shape == (64, 64, 3)
    assert np.abs(pixels[:, 4:60].astype(int) - GREEN).max() <= 2
    assert pixels.min() >= 0 and load_one(path).pixels.abs().max() <= 1.0


def test_stretch_keeps_the_whole_image(tmp_path):
    path = tmp_path / "wide.png"
    halves((128, 64), RED, BLUE).save(path)

    pixels = as_uint8(load_one(path, resize="stretch").pixels)

    assert tuple(pixels[32, 8]) == RED
    assert tuple(pixels[32, 56]) == BLUE


def test_pad_fills_with_white_and_zero_weight(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (128, 64), RED).save(path)

    image = load_one(path, resize="pad")  # fitted to 64x32, centred vertically: rows 16..47

    pixels = as_uint8(image.pixels)
    assert tuple(pixels[4, 32]) == WHITE and tuple(pixels[60, 32]) == WHITE
    assert tuple(pixels[32, 32]) == RED
    assert image.weight is not None and image.weight.shape == (1, 64, 64)
    assert image.weight[0, :16].max() == 0 and image.weight[0, 48:].max() == 0
    assert image.weight[0, 17:47].min() == 1


def test_rgba_alpha_becomes_weight_exactly_at_training_size(tmp_path):
    alpha = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))  # 0..252 left to right
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = alpha
    path = tmp_path / "gradient.png"
    Image.fromarray(rgba, "RGBA").save(path)

    image = load_one(path)

    torch.testing.assert_close(image.weight, torch.from_numpy(alpha.astype(np.float32) / 255.0)[None])
    # black composited over white: 255 * (1 - alpha)
    expected_grey = np.rint(255.0 * (1.0 - alpha.astype(np.float32) / 255.0))
    assert np.abs(as_uint8(image.pixels)[..., 0].astype(float) - expected_grey).max() <= 1


def test_rgba_partial_alpha_weight_follows_resize(tmp_path):
    path = tmp_path / "half_transparent.png"
    halves((128, 128), (0, 0, 0, 255), (0, 0, 0, 64), mode="RGBA").save(path)

    image = load_one(path)  # downscaled 2x

    weight = image.weight[0]
    torch.testing.assert_close(weight[:, :28], torch.ones(64, 28))
    torch.testing.assert_close(weight[:, 36:], torch.full((64, 28), 64 / 255))
    pixels = as_uint8(image.pixels)
    assert np.abs(pixels[:, :28].astype(int) - 0).max() <= 1
    assert np.abs(pixels[:, 36:].astype(int) - round(255 * (1 - 64 / 255))).max() <= 1


def test_cmyk_jpeg_is_converted_to_the_right_colours(tmp_path):
    source = Image.new("CMYK", (128, 64), (255, 0, 0, 0))  # pure cyan
    source.paste((0, 0, 0, 128), (64, 0, 128, 64))  # 50 % black
    path = tmp_path / "print.jpg"
    source.save(path, quality=95)
    assert Image.open(path).mode == "CMYK"

    pixels = as_uint8(load_one(path, 128, 64).pixels).astype(int)

    assert np.abs(pixels[32, 16] - (0, 255, 255)).max() <= 8
    assert np.abs(pixels[32, 112] - (127, 127, 127)).max() <= 8


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    levels = np.array([0, 128 * 257, 65535], dtype=np.uint16)  # -> 0, 128, 255
    grey16 = np.repeat(levels, 64)[None, :].repeat(64, axis=0)  # 192x64, three vertical bands
    path = tmp_path / "deep.png"
    Image.fromarray(grey16).save(path)
    assert Image.open(path).mode in ("I", "I;16")

    pixels = as_uint8(load_one(path, 192, 64).pixels)

    assert tuple(pixels[32, 32]) == (0, 0, 0)
    assert tuple(pixels[32, 96]) == (128, 128, 128)
    assert tuple(pixels[32, 160]) == (255, 255, 255)


def test_palette_transparency_becomes_weight_over_white(tmp_path):
    source = Image.new("P", (64, 64), 1)
    source.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    source.paste(0, (32, 0, 64, 64))  # right half: index 0, declared transparent
    path = tmp_path / "sprite.png"
    source.save(path, transparency=0)

    image = load_one(path)

    assert tuple(as_uint8(image.pixels)[10, 10]) == BLUE
    assert tuple(as_uint8(image.pixels)[10, 50]) == WHITE  # red but transparent -> white
    assert image.weight[0, :, :32].min() == 1 and image.weight[0, :, 32:].max() == 0


def test_palette_without_transparency_is_plain_rgb(tmp_path):
    path = tmp_path / "indexed.png"
    halves((64, 64), RED, BLUE).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)

    image = load_one(path)

    assert image.weight is None
    assert tuple(as_uint8(image.pixels)[10, 10]) == RED


def test_exif_orientation_is_applied(tmp_path):
    # Stored 128x64 with red on the left; orientation 6 means "rotate 90 degrees clockwise to display",
    # so the displayed image is 64x128 with red on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    halves((128, 64), RED, BLUE).save(path, exif=exif.tobytes(), quality=95)

    image = load_one(path, 64, 128)

    assert image.pixels.shape == (3, 128, 64)
    pixels = as_uint8(image.pixels).astype(int)
    assert np.abs(pixels[16, 32] - RED).max() <= 8
    assert np.abs(pixels[112, 32] - BLUE).max() <= 8


def test_greyscale_and_bilevel_become_rgb(tmp_path):
    grey_path = tmp_path / "grey.png"
    Image.new("L", (64, 64), 100).save(grey_path)
    bilevel_path = tmp_path / "bilevel.bmp"
    Image.new("1", (64, 64), 1).save(bilevel_path)

    grey, bilevel = load_training_images([grey_path, bilevel_path], 64, 64)

    assert tuple(as_uint8(grey.pixels)[5, 5]) == (100, 100, 100)
    assert tuple(as_uint8(bilevel.pixels)[5, 5]) == WHITE


def write_animation(path: Path) -> None:
    frames = [Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 64), BLUE)]
    options = {"lossless": True} if path.suffix == ".webp" else {}
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)


@pytest.mark.parametrize(
    "file_name",
    [
        "anim.gif",
        pytest.param(
            "anim.webp",
            marks=pytest.mark.skipif(not features.check("webp_anim"), reason="Pillow built without animated WebP"),
        ),
    ],
)
def test_animation_uses_first_frame(tmp_path, file_name):
    path = tmp_path / file_name
    write_animation(path)
    with Image.open(path) as written:
        assert written.n_frames == 2

    pixels = as_uint8(load_one(path).pixels).astype(int)

    assert np.abs(pixels[32, 32] - RED).max() <= 2


def test_mask_file_multiplies_with_alpha(tmp_path):
    path = tmp_path / "cat.png"
    halves((64, 64), (0, 0, 0, 255), (0, 0, 0, 128), mode="RGBA").save(path)
    mask = Image.new("RGB", (32, 32), (0, 0, 0))  # any mode, any resolution with the same aspect
    mask.paste(WHITE, (0, 0, 32, 16))  # top half white
    mask_path = tmp_path / "cat_att.png"
    mask.save(mask_path)
    assert find_mask_path(path) == mask_path

    weight = load_one(path).weight[0]

    torch.testing.assert_close(weight[:24, :24], torch.ones(24, 24))
    torch.testing.assert_close(weight[:24, 40:], torch.full((24, 24), 128 / 255))
    assert weight[40:].max() == 0


def test_mask_file_alone_gives_weight(tmp_path):
    path = tmp_path / "dog.jpg"
    Image.new("RGB", (64, 64), GREEN).save(path)
    halves((64, 64), 255, 51, mode="L").save(tmp_path / "dog_att.webp", lossless=True)

    weight = load_one(path).weight[0]

    torch.testing.assert_close(weight[:, :24], torch.ones(64, 24))
    torch.testing.assert_close(weight[:, 40:], torch.full((64, 24), 0.2))


def test_caption_with_bom_and_whitespace(tmp_path):
    path = tmp_path / "girl.png"
    Image.new("RGB", (64, 64), RED).save(path)
    (tmp_path / "girl.txt").write_bytes("\ufeff  1girl, red hair, smile \n\n".encode("utf-8"))

    assert read_caption(path) == "1girl, red hair, smile"
    assert load_one(path).caption == "1girl, red hair, smile"
    assert read_caption(tmp_path / "no_caption.png") == ""


def test_caption_that_is_not_utf8_is_a_problem_of_its_image(tmp_path):
    path = tmp_path / "girl.png"
    Image.new("RGB", (64, 64), RED).save(path)
    (tmp_path / "girl.txt").write_bytes(b"caf\xe9")  # Latin-1

    with pytest.raises(ImageInputError) as raised:
        load_one(path)

    assert_single_problem(raised.value, path, str(tmp_path / "girl.txt"))


# ---------------------------------------------------------------------------------------------------------
# collecting files


def test_folder_collection_skips_masks_hidden_and_non_images(tmp_path):
    for name in ("b.png", "a.JPG", "a_att.png", ".hidden.png", "c.webp"):
        Image.new("RGB", (64, 64), RED).save(tmp_path / name, format="PNG")
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (64, 64), RED).save(tmp_path / "sub" / "deeper.png")

    assert collect_image_paths([tmp_path]) == [tmp_path / "a.JPG", tmp_path / "b.png", tmp_path / "c.webp"]
    # A single path (not in a list) works too, and a file named twice is kept once.
    assert collect_image_paths(str(tmp_path)) == collect_image_paths([tmp_path, tmp_path / "b.png"])
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"} == IMAGE_EXTENSIONS


def test_collect_reports_missing_paths_and_empty_folders(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ImageInputError) as raised:
        collect_image_paths([missing])
    assert_single_problem(raised.value, missing, "does not exist")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "only_a_mask_att.png").write_bytes(b"")
    with pytest.raises(ImageInputError) as raised:
        collect_image_paths([empty])
    assert_single_problem(raised.value, empty, "no training images")


# ---------------------------------------------------------------------------------------------------------
# bad input: each is rejected with a message that names the file


def make_zero_byte(directory: Path) -> Path:
    path = directory / "empty.png"
    path.write_bytes(b"")
    return path


def make_text_renamed_png(directory: Path) -> Path:
    path = directory / "notes.png"
    path.write_text("these are my notes, not a picture\n" * 10)
    return path


def make_truncated(directory: Path, suffix: str) -> Path:
    whole = directory / f"whole{suffix}"
    noise_image().save(whole)
    data = whole.read_bytes()
    whole.unlink()
    path = directory / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    return path


def make_tiny(directory: Path) -> Path:
    path = directory / "tiny.png"
    Image.new("RGB", (12, 12), RED).save(path)
    return path


def make_fully_transparent(directory: Path) -> Path:
    path = directory / "ghost.png"
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(path)
    return path


def make_lab_tiff(directory: Path) -> Path:
    path = directory / "lab.tif"
    Image.new("LAB", (64, 64), (50, 0, 0)).save(path)
    return path


BAD_INPUTS = {
    "zero-byte": (make_zero_byte, "empty (0 bytes)"),
    "text renamed .png": (make_text_renamed_png, "is not an image"),
    "truncated png": (lambda directory: make_truncated(directory, ".png"), "is truncated or corrupt"),
    "truncated jpeg": (lambda directory: make_truncated(directory, ".jpg"), "is truncated or corrupt"),
    "tiny": (make_tiny, f"is 12x12 px; at least {MIN_SIDE} px on each side is needed"),
    "huge header": (lambda directory: write_png_header_only(directory / "huge.png", 8000, 8000), "too large"),
    "bomb header": (lambda directory: write_png_header_only(directory / "bomb.png", 20000, 20000), "too large"),
    "fully transparent": (make_fully_transparent, "fully transparent"),
    "unsupported mode": (make_lab_tiff, "'LAB', which is not supported"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_rejected_naming_the_file(tmp_path, kind):
    make, phrase = BAD_INPUTS[kind]
    path = make(tmp_path)
    size_before = path.stat().st_size

    with pytest.raises(ImageInputError) as raised:
        load_training_images([path], 64, 64)

    assert_single_problem(raised.value, path, phrase)
    assert path.stat().st_size == size_before  # nothing was touched


def test_huge_header_is_rejected_before_decoding(tmp_path):
    path = write_png_header_only(tmp_path / "huge.png", 8000, 8000)
    assert 8000 * 8000 > MAX_PIXELS
    with pytest.raises(ImageInputError) as raised:
        load_training_images([path], 64, 64)
    # The pixel data is one row long: a decode attempt would have reported truncation instead.
    assert "truncated" not in str(raised.value)
    assert "8000x8000" in str(raised.value)


def test_broken_mask_is_a_problem_of_its_image_naming_the_mask(tmp_path):
    path = tmp_path / "cat.png"
    Image.new("RGB", (64, 64), RED).save(path)
    mask_path = tmp_path / "cat_att.png"
    mask_path.write_text("not a mask")

    with pytest.raises(ImageInputError) as raised:
        load_one(path)

    assert_single_problem(raised.value, path, str(mask_path))


def test_all_or_nothing_lists_only_the_bad_files(tmp_path):
    Image.new("RGB", (64, 64), RED).save(tmp_path / "good_1.png")
    noise_image().save(tmp_path / "good_2.jpg")
    bad = sorted([make_tiny(tmp_path), make_zero_byte(tmp_path)])

    with pytest.raises(ImageInputError) as raised:
        load_training_images([tmp_path], 64, 64)

    assert sorted(path for path, _ in raised.value.problems) == bad
    message = str(raised.value)
    assert len(message.splitlines()) == 2
    assert "good_1" not in message and "good_2" not in message


def test_missing_path_given_to_loader(tmp_path):
    missing = tmp_path / "gone.png"
    with pytest.raises(ImageInputError) as raised:
        load_training_images([missing], 64, 64)
    assert_single_problem(raised.value, missing, "does not exist")


def test_pil_global_state_is_left_alone(tmp_path):
    settings_before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    truncated = make_truncated(tmp_path, ".png")
    huge = write_png_header_only(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(ImageInputError):
        load_training_images([truncated, huge], 64, 64)
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS) == settings_before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # truncated files must never be accepted silently


@pytest.mark.parametrize("width, height", [(0, 64), (60, 64), (64, -8), (64, 64.0), (True, 64)])
def test_training_size_must_be_positive_multiple_of_8(tmp_path, width, height):
    with pytest.raises(ValueError, match="multiple of 8"):
        load_training_images([tmp_path], width, height)


def test_unknown_resize_mode(tmp_path):
    with pytest.raises(ValueError, match="crop, pad, stretch"):
        load_training_images([tmp_path], 64, 64, resize="zoom")


# ---------------------------------------------------------------------------------------------------------
# templates


def test_builtin_templates_resolve_and_load():
    for name in BUILTIN_TEMPLATES:
        path = resolve_template(name)
        assert path == builtin_template_dir() / f"{name}.txt"
        lines = load_templates(path)
        assert lines and all("[name]" in line for line in lines)
        if name.endswith("_filewords"):
            assert all("[filewords]" in line for line in lines)
    assert resolve_template("subject.txt") == resolve_template("subject")
    assert len(load_templates(resolve_template("subject"))) >= 15


def test_template_from_extra_dir_or_path(tmp_path):
    host_dir = tmp_path / "textual_inversion_templates"
    (host_dir / "nested").mkdir(parents=True)
    (host_dir / "mine.txt").write_text("a [name] on a shelf\n")
    (host_dir / "nested" / "deep.txt").write_text("a [name] in a box\n")
    loose = tmp_path / "loose.txt"
    loose.write_text("[name]\n")

    assert resolve_template("mine", [host_dir]) == host_dir / "mine.txt"
    assert resolve_template("mine.txt", [host_dir]) == host_dir / "mine.txt"
    assert resolve_template("deep", [host_dir]) == host_dir / "nested" / "deep.txt"
    assert resolve_template(str(loose)) == loose
    with pytest.raises(ValueError) as raised:
        resolve_template("unknown_one", [host_dir])
    for listed in (*BUILTIN_TEMPLATES, "mine", "deep"):
        assert listed in str(raised.value)


def test_template_line_without_name_reports_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("a photo of [name]\n\nthe painting of [filewords]\n")
    with pytest.raises(ValueError) as raised:
        load_templates(path)
    assert str(path) in str(raised.value)
    assert "line 3" in str(raised.value)


def test_empty_template_file(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n   \n")
    with pytest.raises(ValueError) as raised:
        load_templates(path)
    assert str(path) in str(raised.value)


def test_load_templates_strips_and_skips_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeff  a photo of [name]  \n\n[name], [filewords]\n".encode())
    assert load_templates(path) == ["a photo of [name]", "[name], [filewords]"]


# ---------------------------------------------------------------------------------------------------------
# prompt rendering

TAGS = [f"tag{index}" for index in range(12)]
CAPTION = ", ".join(TAGS)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tags_of(prompt: str) -> list[str]:
    return [tag for tag in prompt.removeprefix("photo of cat, ").split(", ") if tag]


def test_render_replaces_placeholders():
    assert render_prompt("a photo of [name], [filewords]", "cat", "red, fluffy") == "a photo of cat, red, fluffy"
    assert render_prompt("[name] by [name]", "cat") == "cat by cat"
    # A caption containing "[name]" is inserted as text, not substituted again.
    assert render_prompt("[filewords] [name]", "cat", "[name]") == "[name] cat"


def test_render_with_empty_caption_leaves_no_dangling_comma():
    assert render_prompt("a photo of [name], [filewords]", "cat") == "a photo of cat"
    assert render_prompt("[filewords], art by [name]", "cat", "  ") == "art by cat"


def test_shuffle_and_dropout_are_reproducible_per_seed():
    def run(seed: int) -> list[str]:
        generator = seeded(seed)
        return [
            render_prompt("photo of [name], [filewords]", "cat", CAPTION, shuffle_tags=True, tag_dropout=0.3, generator=generator)
            for _ in range(5)
        ]

    random.seed(1)
    torch.manual_seed(1)
    first = run(7)
    random.seed(2)  # neither Python's nor torch's global RNG may influence the result
    torch.manual_seed(2)
    assert run(7) == first
    assert run(8) != first
    assert len(set(first)) > 1  # the generator advances between calls
    for prompt in first:
        assert set(tags_of(prompt)) <= set(TAGS)


def test_dropout_zero_keeps_every_tag():
    verbatim = render_prompt("photo of [name], [filewords]", "cat", CAPTION, tag_dropout=0.0, generator=seeded(0))
    assert tags_of(verbatim) == TAGS
    shuffled = render_prompt("photo of [name], [filewords]", "cat", CAPTION, shuffle_tags=True, generator=seeded(0))
    assert sorted(tags_of(shuffled)) == sorted(TAGS) and tags_of(shuffled) != TAGS


def test_dropout_one_drops_every_tag():
    prompt = render_prompt("photo of [name], [filewords]", "cat", CAPTION, tag_dropout=1.0, generator=seeded(0))
    assert prompt == "photo of cat"


def test_dropout_probability_out_of_range():
    with pytest.raises(ValueError, match="tag_dropout"):
        render_prompt("[name]", "cat", "a, b", tag_dropout=1.5)


# ---------------------------------------------------------------------------------------------------------
# shipped sample


def test_sample_image_is_small_loadable_and_reproducible():
    sample = ASSETS / "sample.png"
    assert sample.stat().st_size < 40_000
    with Image.open(sample) as image:
        assert (image.mode, image.size) == ("RGB", (256, 256))
        stored = np.asarray(image)

    loaded = load_one(sample, 256, 256)
    assert loaded.caption and "," in loaded.caption

    spec = importlib.util.spec_from_file_location("make_sample", ASSETS / "make_sample.py")
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)
    assert np.array_equal(np.asarray(make_sample.draw_sample()), stored)


@pytest.mark.parametrize("source, expected", [((1600, 900), (1344, 768)), ((900, 1600), (768, 1344)),
                                              ((1000, 1000), (1024, 1024)), ((4000, 500), (2048, 512))])
def test_buckets_keep_the_aspect_ratio_within_the_area(source, expected):
    from dreamartist_ext.data import bucket_size

    width, height = bucket_size(*source, 1024, 1024, 64)
    assert (width, height) == expected
    assert width % 64 == 0 and height % 64 == 0 and width * height <= 1024 * 1024


def test_bucket_mode_gives_each_image_its_own_size(tmp_path):
    from support import write_image

    wide = write_image(tmp_path / "wide.png", size=(160, 80))
    tall = write_image(tmp_path / "tall.png", size=(80, 160), seed=1)
    images = load_training_images([wide, tall], 64, 64, resize="bucket", multiple=16)
    assert [tuple(i.pixels.shape) for i in images] == [(3, 48, 80), (3, 80, 48)]  # 96x48 would exceed 64x64

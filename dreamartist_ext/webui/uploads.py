"""Images sent as bytes (base64 in an API request): decoded and checked once, then written into a folder the
training run reads as usual."""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..data import IMAGE_EXTENSIONS, ImageInputError

MAX_UPLOAD_BYTES = 64 * 1024 * 1024

_SAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Upload:
    """One image sent as bytes (e.g. base64 in an API request)."""

    data: str | bytes  # base64 text (a ``data:...;base64,`` prefix is allowed) or raw bytes
    filename: str | None = None
    caption: str | None = None


def stage_uploads(uploads: Sequence[Upload], folder: Path) -> list[Path]:
    """Decode and check every upload, then write them into ``folder`` (captions as ``<stem>.txt``).

    Nothing is written unless every item decodes to an image PIL can read; ImageInputError names each bad one
    as ``images[i]``. File names are reduced to safe characters and made unique."""
    from PIL import Image

    decoded: list[tuple[bytes, str]] = []
    problems: list[tuple[Path, str]] = []
    for index, upload in enumerate(uploads):
        label = Path(f"images[{index}]" + (f" ({Path(upload.filename).name})" if upload.filename else ""))
        raw = upload.data
        if isinstance(raw, str):
            text = raw.split(",", 1)[1] if raw.startswith("data:") and "," in raw else raw
            try:
                raw = base64.b64decode("".join(text.split()), validate=True)
            except (binascii.Error, ValueError):
                problems.append((label, "is not valid base64"))
                continue
        if not raw:
            problems.append((label, "is empty (0 bytes)"))
            continue
        if len(raw) > MAX_UPLOAD_BYTES:
            problems.append((label, f"is {len(raw) / 2**20:.0f} MiB; at most {MAX_UPLOAD_BYTES // 2**20} MiB"))
            continue
        try:
            with Image.open(io.BytesIO(raw)) as image:
                image_format = (image.format or "png").lower()
                image.verify()
        except Exception as error:  # PIL raises many types for broken data
            problems.append((label, f"is not an image PIL can read ({type(error).__name__})"))
            continue
        decoded.append((raw, _upload_name(upload.filename, index, image_format)))
    if problems:
        raise ImageInputError(problems)
    folder.mkdir(parents=True, exist_ok=True)
    paths, taken = [], set()
    for (raw, name), upload in zip(decoded, uploads, strict=True):
        stem, suffix = Path(name).stem, Path(name).suffix
        candidate, n = name, 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{stem}-{n}{suffix}"
        taken.add(candidate.lower())
        path = folder / candidate
        path.write_bytes(raw)
        if upload.caption:
            path.with_suffix(".txt").write_text(upload.caption, encoding="utf-8")
        paths.append(path)
    return paths


def _upload_name(filename: str | None, index: int, image_format: str) -> str:
    base = _SAFE_FILENAME.sub("_", Path(filename or "").name).lstrip(".")
    extension = {"jpeg": ".jpg", "tiff": ".tif"}.get(image_format, f".{image_format}")
    if not base or Path(base).suffix.lower() not in IMAGE_EXTENSIONS:
        base = f"{Path(base).stem or f'image-{index}'}{extension}"
    if Path(base).stem.endswith("_att"):  # would be taken for a mask file
        base = f"{Path(base).stem}-image{Path(base).suffix}"
    return base

"""The one-line progress text of a training step, shared by the CLI (when stderr is not a terminal) and the
WebUI job (under the host's progress bar)."""

from __future__ import annotations

import math
from typing import Mapping


def progress_text(step: int, total: int, values: Mapping[str, float], steps_per_second: float,
                  eta_seconds: float | None) -> str:
    """The line shown under the host's progress bar: ``step 120/3000 · loss 0.1234 · 1.9 it/s · ETA 25:10``."""
    parts = [f"step {step}/{total}"]
    loss = values.get("loss")
    if loss is not None:
        parts.append(f"loss {loss:.4f}" if math.isfinite(loss) else "loss not finite")
    if steps_per_second > 0:
        parts.append(f"{steps_per_second:.1f} it/s" if steps_per_second >= 1 else f"{1 / steps_per_second:.1f} s/it")
    parts.append(f"ETA {_clock(eta_seconds)}")
    return " · ".join(parts)


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"

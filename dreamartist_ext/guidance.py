"""Guidance scale of the CFG-combined loss: constant, or dynamic over the timestep.

Syntax (parsed, never evaluated): ``"3"`` for a constant scale, or ``"L-H"`` / ``"L-H:curve"`` with curve one of
``linear`` (default), ``cos``, ``cos2``:

    g(t) = L + (H - L) * f(t / (T - 1))

    linear  f(x) = x
    cos     f(x) = 1 - cos(pi x / 2)          (stays near L for small t, rises late)
    cos2    f(x) = (1 - cos(pi x)) / 2        (smooth S-curve from L to H)

so low-noise steps (small t) are trained at L and high-noise steps at H.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

CURVES = ("linear", "cos", "cos2")
MAX_SCALE = 50.0
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_PATTERN = re.compile(rf"^\s*{_NUMBER}\s*(?:-\s*{_NUMBER}\s*(?::\s*([a-z0-9]+)\s*)?)?$", re.IGNORECASE)


class GuidanceSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class GuidanceSchedule:
    low: float
    high: float
    curve: str = "linear"

    @classmethod
    def parse(cls, text: str | float | int) -> "GuidanceSchedule":
        if isinstance(text, (int, float)):
            text = repr(float(text))
        match = _PATTERN.match(text or "")
        if not match:
            raise GuidanceSyntaxError(
                f"guidance {text!r} is not understood; write a number like '3' or a range like '1-5' or '1-5:cos' "
                f"(curves: {', '.join(CURVES)})"
            )
        low = float(match.group(1))
        high = float(match.group(2)) if match.group(2) is not None else low
        curve = (match.group(3) or "linear").lower()
        if curve not in CURVES:
            raise GuidanceSyntaxError(f"guidance curve {curve!r} is unknown; use one of {', '.join(CURVES)}")
        for value in (low, high):
            if not 0.0 < value <= MAX_SCALE:
                raise GuidanceSyntaxError(f"guidance {value:g} is out of range; use values in (0, {MAX_SCALE:g}]")
        return cls(low, high, curve)

    @property
    def is_constant(self) -> bool:
        return self.low == self.high

    def shape(self, x: torch.Tensor) -> torch.Tensor:
        if self.curve == "linear":
            return x
        if self.curve == "cos":
            return 1.0 - torch.cos(x * (math.pi / 2))
        return (1.0 - torch.cos(x * math.pi)) / 2

    def __call__(self, timesteps: torch.Tensor, num_timesteps: int) -> torch.Tensor:
        """Scale per sample, float32, same device as ``timesteps``."""
        t = timesteps.to(torch.float32)
        if self.is_constant:
            return torch.full_like(t, self.low)
        x = t / max(num_timesteps - 1, 1)
        return self.low + (self.high - self.low) * self.shape(x)

    def __str__(self) -> str:
        if self.is_constant:
            return f"{self.low:g}"
        return f"{self.low:g}-{self.high:g}:{self.curve}"

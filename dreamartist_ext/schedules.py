"""Learning-rate schedules in the WebUI's syntax, e.g. ``"0.005:100, 1e-3:1000, 1e-5"``.

Each comma-separated item is ``rate`` or ``rate:until_step``: the rate applies to optimizer steps below
``until_step``; an item without a step applies to the end. If the last item has a step, training ends there
(the WebUI behaves the same). Parsed, never evaluated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_ITEM = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(?::\s*([0-9]+)\s*)?$", re.IGNORECASE)


class ScheduleSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class LearningRateSchedule:
    rates: tuple[tuple[float, int | None], ...]  # (rate, until_step or None)

    @classmethod
    def parse(cls, text: str | float) -> "LearningRateSchedule":
        if isinstance(text, (int, float)):
            text = repr(float(text))
        items = [part for part in (text or "").split(",")]
        if not text or not text.strip():
            raise ScheduleSyntaxError("learning rate is empty")
        rates: list[tuple[float, int | None]] = []
        for index, item in enumerate(items):
            match = _ITEM.match(item)
            if not match:
                raise ScheduleSyntaxError(
                    f"learning rate item {item.strip()!r} is not understood; write 'rate' or 'rate:step', "
                    f"e.g. '0.005:100, 1e-3:1000, 1e-5'"
                )
            rate = float(match.group(1))
            until = int(match.group(2)) if match.group(2) is not None else None
            if not (math.isfinite(rate) and rate > 0):
                raise ScheduleSyntaxError(f"learning rate {match.group(1)} must be positive")
            if until is None and index != len(items) - 1:
                raise ScheduleSyntaxError(f"only the last learning rate item may omit ':step' (item {item.strip()!r})")
            if until is not None and rates and rates[-1][1] is not None and until <= rates[-1][1]:
                raise ScheduleSyntaxError(f"learning rate steps must increase ({rates[-1][1]} then {until})")
            if until is not None and until <= 0:
                raise ScheduleSyntaxError("learning rate steps must be positive")
            rates.append((rate, until))
        return cls(tuple(rates))

    def rate_at(self, step: int) -> float:
        """Rate of optimizer step ``step`` (0-based)."""
        for rate, until in self.rates:
            if until is None or step < until:
                return rate
        return self.rates[-1][0]

    @property
    def end_step(self) -> int | None:
        """Step at which the schedule ends training, if its last item names one."""
        return self.rates[-1][1]

    def __str__(self) -> str:
        return ", ".join(f"{rate:g}" + (f":{until}" if until is not None else "") for rate, until in self.rates)

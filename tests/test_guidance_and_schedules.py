"""Guidance and learning-rate syntax: parsed (never evaluated), with the documented values."""

from __future__ import annotations

import math

import pytest
import torch

from dreamartist_ext.guidance import GuidanceSchedule, GuidanceSyntaxError
from dreamartist_ext.schedules import LearningRateSchedule, ScheduleSyntaxError

T = 1001  # so that t = T/2 = 500 sits exactly at x = t/(T-1) = 0.5


@pytest.mark.parametrize(
    "text, at_0, at_half, at_end",
    [
        ("3", 3.0, 3.0, 3.0),
        ("1-5", 1.0, 3.0, 5.0),
        ("1-5:linear", 1.0, 3.0, 5.0),
        ("1-5:cos", 1.0, 1.0 + 4.0 * (1 - math.cos(math.pi / 4)), 5.0),
        ("1-5:cos2", 1.0, 3.0, 5.0),
        ("5-1:cos2", 5.0, 3.0, 1.0),
        (" 2.5 - 7.5 : COS ", 2.5, 2.5 + 5.0 * (1 - math.cos(math.pi / 4)), 7.5),
    ],
)
def test_dynamic_guidance_values_at_0_half_and_end(text, at_0, at_half, at_end):
    schedule = GuidanceSchedule.parse(text)
    values = schedule(torch.tensor([0, (T - 1) // 2, T - 1]), T)
    torch.testing.assert_close(values, torch.tensor([at_0, at_half, at_end]), rtol=1e-6, atol=1e-6)


def test_cos2_is_an_s_curve_and_cos_rises_late():
    t = torch.arange(T)
    cos2 = GuidanceSchedule.parse("0.5-1.5:cos2")(t, T)
    cos = GuidanceSchedule.parse("0.5-1.5:cos")(t, T)
    linear = GuidanceSchedule.parse("0.5-1.5")(t, T)
    assert torch.all(cos2[1:] >= cos2[:-1]) and torch.all(cos[1:] >= cos[:-1])
    assert cos[T // 4] < linear[T // 4] and cos2[T // 4] < linear[T // 4] < cos2[3 * T // 4] - 0.2
    assert str(GuidanceSchedule.parse("1-5:cos")) == "1-5:cos" and str(GuidanceSchedule.parse("3")) == "3"


@pytest.mark.parametrize("bad", ["", "abc", "3+1", "__import__('os')", "1-5:sin", "0", "-3", "1-100", "1-5:", "1--5"])
def test_bad_guidance_is_refused_with_a_message(bad):
    with pytest.raises(GuidanceSyntaxError) as error:
        GuidanceSchedule.parse(bad)
    assert str(error.value)


def test_learning_rate_schedule_follows_the_webui_syntax():
    schedule = LearningRateSchedule.parse("0.005:100, 1e-3:1000, 1e-5")
    assert [schedule.rate_at(s) for s in (0, 99, 100, 999, 1000, 10**6)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]
    assert schedule.end_step is None
    ending = LearningRateSchedule.parse("0.01:10, 0.001:20")
    assert ending.end_step == 20 and ending.rate_at(25) == 0.001
    assert LearningRateSchedule.parse(0.0025).rate_at(5) == 0.0025
    assert str(schedule) == "0.005:100, 0.001:1000, 1e-05"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("", "empty"),
        ("fast", "not understood"),
        ("0.01, 0.001:100", "only the last"),
        ("0.01:100, 0.001:50", "increase"),
        ("0:10", "positive"),
        ("1e-3:0", "positive"),
        ("exec('x')", "not understood"),
    ],
)
def test_bad_learning_rates_are_refused(bad, message):
    with pytest.raises(ScheduleSyntaxError, match=message):
        LearningRateSchedule.parse(bad)

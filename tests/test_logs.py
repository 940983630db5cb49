from __future__ import annotations

import math
import random

import pytest
from PIL import Image

from dreamartist_ext.logs import LossLog, plot_losses

ORANGE = (0xFF, 0x7F, 0x0E)  # second palette colour: the second field's line


def noisy_losses(count: int, seed: int = 0) -> list[dict[str, float]]:
    rng = random.Random(seed)
    return [
        {"step": step, "loss": 0.1 + 0.3 * math.exp(-step / 60) * (1 + rng.random()), "loss_rec": 0.2 + 0.001 * step}
        for step in range(1, count + 1)
    ]


# --- CSV log -------------------------------------------------------------------------------------------------


def test_rows_round_trip_exactly_with_step_first(tmp_path):
    log = LossLog(tmp_path / "loss.csv", ["loss", "loss_rec"])
    log.append(1, {"loss": 0.1, "loss_rec": 1 / 3})
    log.append(2, {"loss": 1e-300, "loss_rec": 123456.789012345})
    assert (tmp_path / "loss.csv").read_text().splitlines()[0] == "step,loss,loss_rec"
    assert log.read() == [
        {"step": 1, "loss": 0.1, "loss_rec": 1 / 3},
        {"step": 2, "loss": 1e-300, "loss_rec": 123456.789012345},
    ]


def test_each_row_is_on_disk_as_soon_as_it_is_appended(tmp_path):
    path = tmp_path / "loss.csv"
    log = LossLog(path, ["loss"])
    log.append(7, {"loss": 0.25})
    # Another reader (another process after a crash) sees the row without anything being closed.
    assert path.read_text() == "step,loss\n7,0.25\n"


def test_missing_values_read_as_nan_and_nan_is_kept(tmp_path):
    log = LossLog(tmp_path / "loss.csv", ["loss", "loss_rec"])
    log.append(1, {"loss": float("nan")})
    (row,) = log.read()
    assert row["step"] == 1 and math.isnan(row["loss"]) and math.isnan(row["loss_rec"])


def test_unknown_field_is_refused_and_nothing_appended(tmp_path):
    log = LossLog(tmp_path / "loss.csv", ["loss"])
    with pytest.raises(ValueError, match="lsos"):
        log.append(1, {"lsos": 0.5})
    assert log.read() == []


def test_step_in_fields_is_not_duplicated_and_bad_field_names_are_refused(tmp_path):
    assert LossLog(tmp_path / "a.csv", ["step", "loss"]).columns == ["step", "loss"]
    for fields in (["a,b"], [""], ["loss", "loss"]):
        with pytest.raises(ValueError):
            LossLog(tmp_path / "b.csv", fields)


def test_reopening_keeps_rows_and_adds_new_fields_as_columns(tmp_path):
    path = tmp_path / "loss.csv"
    first = LossLog(path, ["loss"])
    first.append(1, {"loss": 0.5})
    second = LossLog(path, ["loss", "loss_rec"])
    second.append(2, {"loss": 0.4, "loss_rec": 0.9})
    rows = second.read()
    assert second.columns == ["step", "loss", "loss_rec"]
    assert rows[0]["loss"] == 0.5 and math.isnan(rows[0]["loss_rec"])
    assert rows[1] == {"step": 2, "loss": 0.4, "loss_rec": 0.9}


def test_row_cut_short_by_a_crash_is_dropped(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("step,loss\n1,0.5\n2,0.4\n3,0.3")  # died while writing step 3
    log = LossLog(path, ["loss"])
    assert [row["step"] for row in log.read()] == [1, 2]
    log.append(3, {"loss": 0.35})
    assert log.read()[-1] == {"step": 3, "loss": 0.35}


def test_truncate_after_drops_later_rows_atomically(tmp_path):
    log = LossLog(tmp_path / "loss.csv", ["loss"])
    for step in range(1, 11):
        log.append(step, {"loss": step / 10})
    log.truncate_after(6)
    assert [row["step"] for row in log.read()] == [1, 2, 3, 4, 5, 6]
    log.append(7, {"loss": 0.0})
    assert [row["step"] for row in log.read()] == [1, 2, 3, 4, 5, 6, 7]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["loss.csv"]  # no temp left behind


def test_a_file_that_is_not_a_loss_log_is_refused(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("name,value\ncat,1\n")
    with pytest.raises(ValueError, match="not a loss log"):
        LossLog(path, ["loss"])
    assert path.read_text() == "name,value\ncat,1\n"


# --- plot ----------------------------------------------------------------------------------------------------


def pixels(path) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def colour_count(path, colour, tolerance: int = 12) -> int:
    with Image.open(path) as image:
        counts = image.convert("RGB").getcolors(maxcolors=1 << 24)
    return sum(
        count for count, pixel in counts if all(abs(channel - wanted) <= tolerance for channel, wanted in zip(pixel, colour))
    )


def test_plot_is_a_png_with_one_coloured_line_per_field(tmp_path):
    path = plot_losses(noisy_losses(300), tmp_path / "loss.png", title="cat", fields=("loss", "loss_rec"))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (960, 540)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # anti-aliased lines and text, not a blank canvas
    assert colour_count(path, ORANGE) > 200  # the second field's line is drawn in its own colour
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


@pytest.mark.parametrize("rows", [[], [{"step": 5, "loss": 0.2}], [{"step": 1, "loss": float("nan")}]])
def test_plot_handles_no_rows_and_a_single_row(tmp_path, rows):
    path = plot_losses(rows, tmp_path / "loss.png", title="early")
    with Image.open(path) as image:
        image.verify()


def test_nan_rows_are_skipped(tmp_path):
    rows = noisy_losses(120)
    with_nan = rows[:50] + [{"step": 50.5, "loss": float("nan"), "loss_rec": float("inf")}] + rows[50:]
    plot_losses(rows, tmp_path / "clean.png", title="t", fields=("loss", "loss_rec"))
    plot_losses(with_nan, tmp_path / "nan.png", title="t", fields=("loss", "loss_rec"))
    assert pixels(tmp_path / "clean.png") == pixels(tmp_path / "nan.png")


def test_log_scale_is_chosen_when_values_span_more_than_two_decades(tmp_path):
    wide = [{"step": step, "loss": 10 ** (-step / 50)} for step in range(200)]  # 4 decades
    narrow = [{"step": step, "loss": 1 + step / 100} for step in range(200)]
    for name, rows, expected_log in (("wide", wide, True), ("narrow", narrow, False)):
        automatic = plot_losses(rows, tmp_path / f"{name}-auto.png", title=name)
        forced = plot_losses(rows, tmp_path / f"{name}-forced.png", title=name, log_scale=expected_log)
        other = plot_losses(rows, tmp_path / f"{name}-other.png", title=name, log_scale=not expected_log)
        assert pixels(automatic) == pixels(forced)
        assert pixels(automatic) != pixels(other)


def test_forced_log_scale_skips_non_positive_values(tmp_path):
    rows = [{"step": 1, "loss": 0.0}, {"step": 2, "loss": -1.0}, {"step": 3, "loss": 0.5}, {"step": 4, "loss": 0.25}]
    plot_losses(rows, tmp_path / "a.png", title="t", log_scale=True)
    plot_losses(rows[2:], tmp_path / "b.png", title="t", log_scale=True)
    assert pixels(tmp_path / "a.png") == pixels(tmp_path / "b.png")


def test_plot_overwrites_an_existing_png(tmp_path):
    path = tmp_path / "loss.png"
    plot_losses(noisy_losses(20), path, title="first")
    first = path.read_bytes()
    plot_losses(noisy_losses(40), path, title="second")
    assert path.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


def test_plot_from_a_loss_log(tmp_path):
    log = LossLog(tmp_path / "loss.csv", ["loss", "loss_rec"])
    for row in noisy_losses(50):
        log.append(row["step"], {"loss": row["loss"], "loss_rec": row["loss_rec"]})
    from_log = plot_losses(log.read(), tmp_path / "from_log.png", title="t", fields=("loss", "loss_rec"))
    direct = plot_losses(noisy_losses(50), tmp_path / "direct.png", title="t", fields=("loss", "loss_rec"))
    assert pixels(from_log) == pixels(direct)

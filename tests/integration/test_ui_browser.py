"""The DreamArtist tab in a real browser: Train > DreamArtist, one uploaded PNG, a tiny job with previews, live
progress, the finished result (gallery, loss plot, files); then "Reload UI", a bad input reported in the tab,
"Create pair" twice (the second refused) and a long job stopped with the tab's Interrupt button.

Needs Debian's chromium (``apt-get install -y chromium chromium-driver``) and ``npm ci`` in tests/browser
(playwright-core drives /usr/bin/chromium); skipped with the reason otherwise. Screenshots go to tests/output/.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import pytest

from browser_driver import MISSING, OUTPUT_DIR, run_driver
from webui_host import mentions_us, tracebacks

NAME = "dabrowser"
INTERRUPTED_NAME = "dabrowserstop"
PAIR_NAME = "dabrowserpair"
STEPS = 6
PREVIEW_EVERY = 2
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def _our_problems(log: str) -> list[str]:
    """Log lines that mention this extension together with a warning or an error."""
    pattern = re.compile(r"warn|error|traceback|exception", re.IGNORECASE)
    return [line for line in log.splitlines() if mentions_us(line) and pattern.search(line)]


def _shown_versus_defaults(shown: dict[str, object]) -> dict[str, tuple]:
    """Fields whose initial value differs from TrainConfig's default: {elem_id: (shown, default)}. Catches labels
    that collide with another Train-tab field (the host's ui-config then hands ours that field's value)."""
    from dreamartist_ext.config import PreviewConfig, TrainConfig

    defaults = TrainConfig(name="")
    preview_fields = {f.name for f in dataclasses.fields(PreviewConfig)}
    wrong = {}
    for elem_id, value in shown.items():
        key = elem_id[len("dreamartist_"):]
        if key.startswith("preview_") and key[len("preview_"):] in preview_fields:
            default = getattr(defaults.preview, key[len("preview_"):])
        elif hasattr(defaults, key):
            default = getattr(defaults, key)
        else:
            continue
        if isinstance(default, bool):
            same = value is default
        elif isinstance(default, (int, float)):
            same = value != "" and float(value) == float(default)
        else:
            same = value == default
        if not same:
            wrong[elem_id] = (value, default)
    return wrong


def _write_png(path: Path) -> Path:
    from support import write_image

    return write_image(path, size=(96, 96), seed=3)


def test_train_in_the_tab_shows_progress_previews_and_survives_reload(webui, tmp_path):
    log_before = len(webui.log())
    started = time.time()

    seen = run_driver("drive_tab.js", {
        "url": webui.url, "image": str(_write_png(tmp_path / "reference.png")),
        "name": NAME, "interruptName": INTERRUPTED_NAME, "pairName": PAIR_NAME,
        "userDataDir": str(tmp_path / "chromium-profile"), "steps": STEPS,
        "size": 64, "previewEvery": PREVIEW_EVERY, "timeoutMs": 600_000,
    })
    print(f"browser run: {time.time() - started:.1f} s; progress texts: {seen['progressTexts']}")

    # Train is disabled while the reference image uploads, says why, and comes back once it has arrived
    states = seen["trainStatesDuringUpload"]
    assert [state["disabled"] for state in states] == [True, False], states
    assert "waiting for the upload" in states[0]["label"], states
    # the form opens with TrainConfig's defaults (the name is empty: no field borrowed another one's saved value)
    assert len(seen["initialValues"]) > 30, seen["initialValues"]
    assert _shown_versus_defaults(seen["initialValues"]) == {}
    # live progress came from the host's /internal/progress polling and changed while the job ran
    assert len(set(seen["progressTexts"])) >= 2, seen
    assert any(re.search(r"step", text, re.IGNORECASE) for text in seen["progressTexts"]), seen
    assert seen["livePreview"], "the host's live preview never showed a training preview over the gallery"
    # the job finished and its results are shown in the tab
    assert seen["status"].startswith("Finished"), seen["status"]
    assert f"step {STEPS}/{STEPS}" in seen["status"], seen["status"]
    assert seen["galleryImages"] == STEPS // PREVIEW_EVERY, seen
    assert seen["lossPlotShown"], seen
    assert any(f"{NAME}-{STEPS:06d}.safetensors" in choice for choice in seen["checkpointChoices"]), seen
    embeddings = webui.data_dir / "embeddings"
    for word in (NAME, f"{NAME}-neg"):
        path = embeddings / f"{word}.safetensors"
        assert path.is_file(), f"{path} was not written"
        assert str(path) in seen["files"], seen["files"]
    # after "Reload UI" the tab is rebuilt and a bad input is reported in the tab, not only in the log
    assert "image" in seen["errorAfterReload"].lower(), seen["errorAfterReload"]
    # "Create pair" writes the untrained pair; a second time without "Overwrite" is refused in the tab
    assert seen["createStatus"].startswith(f"Created {PAIR_NAME} and {PAIR_NAME}-neg"), seen["createStatus"]
    assert (embeddings / f"{PAIR_NAME}-neg.safetensors").is_file()
    assert "already exists" in seen["createAgainStatus"], seen["createAgainStatus"]
    # an upload whose answer gradio dropped (another event finished meanwhile) is reported on the Train button
    assert seen["lostUpload"]["disabled"], seen["lostUpload"]
    assert "upload lost" in seen["lostUpload"]["label"], seen["lostUpload"]
    # Interrupt stops a long job between steps, and what it learned so far is saved
    assert seen["interruptStatus"].startswith("Interrupted at step"), seen["interruptStatus"]
    assert not seen["interruptStatus"].startswith("Interrupted at step 1000/"), seen["interruptStatus"]
    assert (embeddings / f"{INTERRUPTED_NAME}.safetensors").is_file()
    # with every section open, nothing sticks out of the tab
    assert seen["overflowing"] == [], seen["overflowing"]
    for label in ("before", "progress", "after", "upload-lost", "reloaded"):
        assert (OUTPUT_DIR / f"dreamartist-{label}.png").stat().st_size > 10_000

    # no script error in the page; the host's log has no warning or error of ours (UI built at startup and on
    # reload) and no traceback at all while this test ran
    assert seen["pageErrors"] == [], seen["pageErrors"]
    assert not [e for e in seen["consoleErrors"] if "dreamartist" in e.lower()], seen["consoleErrors"]
    log = webui.log()
    ours = log[:log.index("Startup time:")] + log[log_before:]
    assert _our_problems(ours) == [], _our_problems(ours)
    assert tracebacks(log[log_before:]) == [], log[log_before:]

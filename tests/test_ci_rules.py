"""CI's rule (tests/conftest.py): once .ci/run has set the real host up (DREAMARTIST_REQUIRE_HOST=1), a skipped or
deselected test fails the run. Checked by running pytest itself on tests of this suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST_TEST = "tests/test_lora_keys.py::test_mapping_matches_the_host_ldm_unet_tiny"


def _pytest(*args: str, require_host: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SD_WEBUI_DIR", "DREAMARTIST_REQUIRE_HOST")}
    if require_host:
        env["DREAMARTIST_REQUIRE_HOST"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_skipped_host_test_fails_the_run_when_the_host_is_required():
    # without SD_WEBUI_DIR this test skips itself; with the rule on, that skip is a failure with its reason
    plain = _pytest(HOST_TEST, require_host=False)
    assert plain.returncode == 0 and "1 skipped" in plain.stdout, plain.stdout
    required = _pytest(HOST_TEST, require_host=True)
    assert required.returncode == 1, required.stdout
    # a skip in a fixture is reported as an error of the test's setup, one in the test body as a failure
    assert ("1 error" in required.stdout or "1 failed" in required.stdout), required.stdout
    assert "skipped although DREAMARTIST_REQUIRE_HOST=1" in required.stdout, required.stdout
    assert "SD_WEBUI_DIR is not set" in required.stdout, required.stdout


def test_a_deselected_test_fails_the_run_when_the_host_is_required():
    selection = ("tests/test_guidance_and_schedules.py", "-k", "cos2_is_an_s_curve")
    assert _pytest(*selection, require_host=False).returncode == 0
    required = _pytest(*selection, require_host=True)
    assert required.returncode == 1, required.stdout
    assert "deselected although DREAMARTIST_REQUIRE_HOST=1" in required.stdout, required.stdout

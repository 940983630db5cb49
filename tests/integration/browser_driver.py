"""Runs a node driver of tests/browser against a running WebUI in headless Debian Chromium (playwright-core).

Needs Debian's chromium (``apt-get install -y chromium chromium-driver``), Node.js and ``npm ci`` in tests/browser;
``MISSING`` says what is absent, for a skip with that reason (which .ci/run turns into a failure).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from webui_host import REPO

BROWSER_DIR = REPO / "tests" / "browser"
OUTPUT_DIR = REPO / "tests" / "output"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
NODE = shutil.which("node")


def _missing_tools() -> str | None:
    """Why the browser cannot run here, or None. Checked before the host fixture starts a WebUI for nothing."""
    if not CHROMIUM or not Path(CHROMIUM).is_file():
        return "no chromium: apt-get install -y chromium chromium-driver (or set CHROMIUM to its path)"
    if not NODE:
        return "no node: install Node.js >= 20 to drive the browser"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return f"playwright-core is not installed: run `npm ci` in {BROWSER_DIR}"
    return None


MISSING = _missing_tools()


def run_driver(script: str, options: dict, timeout: float = 900) -> dict:
    """Run tests/browser/<script> with ``options`` (chromium's path added); returns the JSON it printed."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    options = {"chromium": CHROMIUM, "outputDir": str(OUTPUT_DIR), **options}
    completed = subprocess.run([NODE, str(BROWSER_DIR / script), json.dumps(options)], cwd=str(BROWSER_DIR),
                               capture_output=True, text=True, timeout=timeout)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    assert lines, f"driver printed no result (rc {completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
    seen = json.loads(lines[-1])
    assert completed.returncode == 0 and "failure" not in seen, (
        f"driver failed: {seen.get('failure')}\nsteps: {seen.get('steps')}\n{completed.stderr[-4000:]}")
    return seen

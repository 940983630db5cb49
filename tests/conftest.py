"""Shared fixtures: tiny random Stable-Diffusion-architecture models (written once per session, tokenizers
included) and a fresh binding on one for every test that needs it: ``binding`` is SD 1.x, ``family_binding``
runs a test once per family (SD 1.x, SD 2.x-v, SDXL)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dreamartist_ext.diffusers_binding import DiffusersBinding
from dreamartist_ext.tiny import FAMILIES, save_tiny_model
from support import write_image

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture()
def binding(tiny_model_dir) -> DiffusersBinding:
    return DiffusersBinding.load(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_family_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    dirs = {"sd1": tiny_model_dir}
    for family in ("sd2", "sdxl"):
        dirs[family] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), seed=0, family=family)
    return dirs


@pytest.fixture(params=FAMILIES)
def family_binding(request, tiny_family_dirs) -> DiffusersBinding:
    return DiffusersBinding.load(tiny_family_dirs[request.param])


@pytest.fixture()
def reference_image(tmp_path) -> Path:
    return write_image(tmp_path / "images" / "ref.png")


# --- CI's rule for the host tier ------------------------------------------------------------------------------
# With DREAMARTIST_REQUIRE_HOST=1 (set by .ci/run once it has set the real WebUI up) a skipped or deselected test
# fails the run: the host tier must never pass by being silently skipped.
REQUIRE_HOST = os.environ.get("DREAMARTIST_REQUIRE_HOST") == "1"
_deselected: list[str] = []


def _as_failure(report) -> None:
    if REQUIRE_HOST and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped although DREAMARTIST_REQUIRE_HOST=1 (the host is set up): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _as_failure(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _as_failure(outcome.get_result())


def pytest_deselected(items):
    _deselected.extend(item.nodeid for item in items)


def pytest_sessionfinish(session, exitstatus):
    if REQUIRE_HOST and _deselected:
        print(f"\n{len(_deselected)} test(s) deselected although DREAMARTIST_REQUIRE_HOST=1: {_deselected[:5]}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

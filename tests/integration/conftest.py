"""Fixtures of the integration tier (see webui_host.py for what it needs and how the host is started)."""

from __future__ import annotations

import pytest

from webui_host import HostSetup, prepare_host, start_webui


@pytest.fixture(scope="session")
def host_setup() -> HostSetup:
    return prepare_host()


@pytest.fixture(scope="session")
def webui(host_setup, tmp_path_factory):
    """One host for the whole session (default settings, no auth)."""
    host = start_webui(host_setup, tmp_path_factory.mktemp("webui-data"))
    yield host
    host.stop()

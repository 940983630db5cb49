"""The extension loads into the real host without errors of its own, and the host still generates."""

from __future__ import annotations

from webui_host import tracebacks


def test_host_starts_with_the_extension_and_generates(webui):
    status, body = webui.post("/sdapi/v1/txt2img", {"prompt": "a cube", "steps": 2, "width": 64, "height": 64})
    assert status == 200, body
    assert len(body["images"]) == 1
    log = webui.log()
    assert "Error loading script" not in log, log
    assert tracebacks(log) == [], log

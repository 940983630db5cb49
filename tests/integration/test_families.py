"""SDXL and SD 2.x-v on the real host: tiny checkpoints built with the host's own classes (build_tiny_families.py),
one host start per family (module-scoped, parametrised)."""

from __future__ import annotations

import pytest

from webui_host import prepare_families, start_webui, tracebacks

FAMILIES = {"tiny-sdxl": dict(size=128, is_sdxl=True), "tiny-sd2v": dict(size=64, is_sdxl=False)}


@pytest.fixture(scope="module")
def families_setup(host_setup):
    return prepare_families(host_setup)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_host(request, families_setup, tmp_path_factory):
    name = request.param
    host = start_webui(families_setup, tmp_path_factory.mktemp(name), checkpoint=name,
                       options={"live_previews_enable": False})
    host.family = name
    yield host
    host.stop()


def txt2img(host, **kw):
    size = FAMILIES[host.family]["size"]
    body = {"prompt": "a cube", "negative_prompt": "", "steps": 2, "width": size, "height": size, "seed": 1,
            "sampler_name": "Euler", **kw}
    status, answer = host.post("/sdapi/v1/txt2img", body)
    assert status == 200, answer
    return answer


def test_the_host_loads_the_family_and_generates(family_host):
    status, options = family_host.get("/sdapi/v1/options")
    assert status == 200
    assert options["sd_model_checkpoint"].startswith(family_host.family), options["sd_model_checkpoint"]
    answer = txt2img(family_host)
    assert len(answer["images"]) == 1
    assert tracebacks(family_host.log()) == [], family_host.log()

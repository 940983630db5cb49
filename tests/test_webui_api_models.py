"""The API's models come from the dataclasses: the job status model from JobStatus, the documented ``options`` of
POST /dreamartist/v1/train from TrainConfig's field metadata -- and the options model only documents, so every
value still reaches the one validation boundary (TrainConfig) as it was sent. (Requests against the real host:
tests/integration/test_api.py.)"""

from __future__ import annotations

import dataclasses
import math

import pytest

pytest.importorskip("fastapi")  # the host's API stack; the plain standalone venv has none

from fastapi import FastAPI  # noqa: E402

from dreamartist_ext.config import ConfigError, PreviewConfig, TrainConfig  # noqa: E402
from dreamartist_ext.webui import api  # noqa: E402
from dreamartist_ext.webui.jobs import JobStatus  # noqa: E402


def _app() -> FastAPI:
    app = FastAPI()
    for path, method, handler, model, status, summary, description, codes in api.ROUTES:
        app.add_api_route(api.PREFIX + path, handler, methods=[method], response_model=model, status_code=status,
                          summary=summary, description=description, tags=api.TAGS, responses=api._errors(*codes))
    return app


def _openapi() -> dict:
    return _app().openapi()


def _documented(cls, skip=()):
    return [f for f in dataclasses.fields(cls) if f.name not in skip and not f.metadata.get("hidden")]


def test_the_train_options_in_openapi_are_every_option_with_type_default_and_help():
    schemas = _openapi()["components"]["schemas"]
    assert schemas["TrainBody"]["properties"]["options"]["allOf"] == [{"$ref": "#/components/schemas/TrainOptions"}]
    properties = schemas["TrainOptions"]["properties"]
    defaults = TrainConfig(name="x")
    expected = _documented(TrainConfig, skip=("name", "images"))
    assert list(properties) == [f.name for f in expected]
    for f in expected:
        prop = properties[f.name]
        assert prop["description"] == f.metadata["help"] and prop["type"], f.name
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        assert prop["default"] == (list(default) if isinstance(default, tuple) else default), f.name
        if f.metadata.get("choices"):
            assert prop["enum"] == list(f.metadata["choices"])
    assert properties["steps"]["type"] == "integer" and properties["guidance"]["type"] == "string"
    assert properties["negative_noise"]["type"] == "number" and properties["flip"]["type"] == "boolean"
    assert properties["adam_betas"] == {**properties["adam_betas"], "type": "array", "items": {"type": "number"},
                                        "minItems": 2, "maxItems": 2}
    preview = properties["preview"]
    assert preview["type"] == "object" and preview["additionalProperties"] is False
    assert {name: p["description"] for name, p in preview["properties"].items()} == {
        f.name: f.metadata["help"] for f in _documented(PreviewConfig)}
    assert "perceptual_random_trunk" not in properties  # hidden (tests only), still accepted


@pytest.mark.parametrize("options", [
    {"stepz": 3},
    {"steps": "abc"},
    {"preview": 5},
    {"adam_betas": [0.9]},
    {"steps": 3.0},
    {"negative_noise": True},
    {"preview": {"steps": "20"}},
])
def test_options_reach_the_config_check_exactly_as_sent(options):
    body = api.TrainBody.parse_obj({"name": "cube", "images": [{"path": "a.png"}], "options": options})
    given = body.options.dict(exclude_unset=True)
    assert given == options
    with pytest.raises(ConfigError) as through_model:
        TrainConfig.from_dict({**given, "name": "cube", "images": ["a.png"]}).validate()
    with pytest.raises(ConfigError) as raw:
        TrainConfig.from_dict({**options, "name": "cube", "images": ["a.png"]}).validate()
    assert str(through_model.value) == str(raw.value)


def test_left_out_options_are_not_sent_as_defaults():
    body = api.TrainBody.parse_obj({"name": "cube", "images": [{"path": "a.png"}]})
    assert body.options.dict(exclude_unset=True) == {}
    body = api.TrainBody.parse_obj({"name": "cube", "images": [{"path": "a.png"}], "options": {"steps": 7}})
    assert body.options.dict(exclude_unset=True) == {"steps": 7}


def test_the_status_model_is_the_job_status_dataclass():
    fields = dataclasses.fields(JobStatus)
    model_fields = api.JobStatusModel.schema()["properties"]
    assert list(model_fields) == [f.name for f in fields]
    assert {name: p["description"] for name, p in model_fields.items()} == {f.name: f.metadata["help"] for f in fields}
    status = JobStatus("abc", state="running", values={"loss": math.nan, "lr": 0.01}, eta_seconds=math.inf,
                       steps_per_second=math.nan)
    parsed = api.JobStatusModel.parse_obj(status.as_json())
    assert parsed.values == {"loss": None, "lr": 0.01} and parsed.eta_seconds is None
    assert parsed.dict() == status.as_json()


def test_create_concept_defaults_and_help_are_the_config_options():
    properties = api.CreateConceptRequest.schema()["properties"]
    defaults = TrainConfig(name="x")
    for name in ("init_text", "positive_vectors", "negative_vectors"):
        help_text = next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == name)
        assert properties[name]["default"] == getattr(defaults, name)
        assert properties[name]["description"] == help_text


@pytest.mark.parametrize("options, status, detail", [
    ({"stepz": 3}, 400, "unknown option(s): stepz"),
    ({"steps": "abc"}, 400, "option 'steps' must be a whole number, got 'abc'"),
    ({"preview": {"stepz": 1}}, 400, "unknown preview option(s): stepz"),
    ({"name": "x"}, 400, "give name at the top level, not in options"),
    ([1], 422, None),
])
def test_bad_options_answer_as_before(options, status, detail):
    """The checks that come before the model is needed: the same answers as when options was a plain dict."""
    from fastapi.testclient import TestClient

    response = TestClient(_app()).post(f"{api.PREFIX}/train", json={
        "name": "cube", "images": [{"path": "a.png"}], "options": options})
    assert response.status_code == status, response.text
    if detail is not None:
        assert response.json()["detail"] == detail

"""The DreamArtist HTTP API, added to the host's FastAPI app (``register`` is the on_app_started callback).

    POST /dreamartist/v1/concepts               create a step-0 pair                      201
    GET  /dreamartist/v1/concepts               list learned concepts                      200
    POST /dreamartist/v1/train                  start a training job                       202
    GET  /dreamartist/v1/jobs                   recent jobs                                200
    GET  /dreamartist/v1/jobs/{job_id}          one job's status                           200 / 404
    POST /dreamartist/v1/jobs/{job_id}/cancel   stop at the next step (the job saves)      200 / 404 / 409

Bad input answers 400 (our checks) or 422 (request shape) with the message in ``detail``; a running job makes
new work answer 409. With ``--api-auth`` the routes want the same HTTP Basic credentials as the host's own.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pydantic
from fastapi import Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from ..config import ConfigError, TrainConfig
from ..names import validate_concept_name
from .jobs import JOBS, REQUEST_ERRORS, BusyError, JobStatus, TrainRequest, concepts, create_pair, new_job_id
from .uploads import Upload, stage_uploads

PREFIX = "/dreamartist/v1"
TAGS = ["DreamArtist"]
PYDANTIC_V2 = pydantic.VERSION.startswith("2")


class _Strict(BaseModel):
    """Request bodies: an unknown field is an error, not silently ignored."""

    if PYDANTIC_V2:
        model_config = pydantic.ConfigDict(extra="forbid")
    else:
        class Config:
            extra = "forbid"


# -- models generated from the dataclasses (their fields and help text are the one source) -------------------------

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _field_schema(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """The JSON schema of a config field's value: its type (from the annotation) and choices."""
    schema: dict[str, Any] = {}
    if hint in _JSON_TYPES:
        schema["type"] = _JSON_TYPES[hint]
    elif typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        schema.update(type="array", items={"type": _JSON_TYPES[items[0]]}, minItems=len(items), maxItems=len(items))
    elif dataclasses.is_dataclass(hint):
        schema.update(type="object", properties=_options_schema(hint), additionalProperties=False)
    if f.metadata.get("choices"):
        schema["enum"] = list(f.metadata["choices"])
    return schema


def _config_fields(cls: type, skip: tuple[str, ...] = ()) -> list[tuple[dataclasses.Field, Any, Any]]:
    """(field, type, default) of a config dataclass's documented fields."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("hidden"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        out.append((f, hints[f.name], default))
    return out


def _options_schema(cls: type) -> dict[str, Any]:
    """The JSON schema properties of a nested config dataclass (PreviewConfig)."""
    return {f.name: {"title": f.name.replace("_", " ").title(), "description": f.metadata.get("help", ""),
                     "default": default, **_field_schema(f, hint)}
            for f, hint, default in _config_fields(cls)}


def _documented(default: Any, description: str, schema: dict[str, Any]) -> Any:
    """A field that pydantic takes as it comes (``Any``) but documents with ``schema``."""
    if PYDANTIC_V2:
        return Field(default, description=description, json_schema_extra=schema)
    return Field(default, description=description, **schema)


def _train_options_model() -> type[BaseModel]:
    """``options`` of POST /train: every TrainConfig option with its type, default and help in the OpenAPI schema.

    The model only documents. The values reach ``TrainConfig.from_dict`` exactly as sent (each field is ``Any``,
    unknown names are kept), so the one boundary checks them and answers 400 with a sentence naming the option
    -- an unknown option, a wrong type, a preview that is not an object -- as it does for the CLI and the tab."""
    fields = {}
    for f, hint, default in _config_fields(TrainConfig, skip=("name", "images")):
        schema = _field_schema(f, hint)
        fields[f.name] = (Any, _documented(default, f.metadata.get("help", ""), schema))
    if PYDANTIC_V2:
        config: Any = pydantic.ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})
    else:
        class config:
            extra = "allow"
            schema_extra = {"additionalProperties": False}  # documents it; TrainConfig.from_dict says which
    return pydantic.create_model("TrainOptions", __config__=config, **fields)


def _json_form(hint: Any) -> Any:
    """The type a value of ``hint`` has in ``JobStatus.as_json``: numbers that are not finite become null."""
    if hint is float:
        return Optional[float]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        return dict[args[0], _json_form(args[1])]
    return hint


def _status_model() -> type[BaseModel]:
    """The API's job status: the fields of ``JobStatus`` (every key is always sent, so each one is required)."""
    hints = typing.get_type_hints(JobStatus)
    fields = {f.name: (_json_form(hints[f.name]), Field(..., description=f.metadata.get("help", "")))
              for f in dataclasses.fields(JobStatus)}
    return pydantic.create_model("JobStatusModel", **fields)


TrainOptions = _train_options_model()
JobStatusModel = _status_model()


def _config_option(name: str) -> Any:
    """A request field with the default and help of TrainConfig's option ``name``."""
    f, _, default = next(item for item in _config_fields(TrainConfig) if item[0].name == name)
    return Field(default, description=f.metadata["help"])


# -- request and response models ------------------------------------------------------------------------------------


class ErrorResponse(BaseModel):
    detail: str = Field(..., description="what was wrong, in a sentence")


class CreateConceptRequest(_Strict):
    name: StrictStr = Field(..., description="the prompt word; its negative partner is `<name>-neg`")
    init_text: StrictStr = _config_option("init_text")
    positive_vectors: StrictInt = _config_option("positive_vectors")
    negative_vectors: StrictInt = _config_option("negative_vectors")
    overwrite: StrictBool = Field(False, description="replace an existing pair of this name (and its adapters)")


class CreateConceptResponse(BaseModel):
    name: str
    files: list[str] = Field(..., description="the embedding files written")


class ConceptFiles(BaseModel):
    embedding: str
    negative_embedding: str | None = None
    lora: str | None = None
    negative_lora: str | None = None


class ConceptItem(BaseModel):
    name: str
    negative_name: str
    files: ConceptFiles
    step: int | None = None
    vectors: int | None = None
    has_adapters: bool
    loaded: bool = Field(..., description="the host's embedding database has the pair")
    metadata: dict[str, Any] = Field(default_factory=dict, description="the files' safetensors metadata")


class ConceptList(BaseModel):
    concepts: list[ConceptItem]


class TrainImage(_Strict):
    path: StrictStr | None = Field(None, description="an image file or folder on the server")
    data: StrictStr | None = Field(None, description="base64 image bytes (a data: URL prefix is allowed)")
    filename: StrictStr | None = Field(None, description="name to store uploaded data under")
    caption: StrictStr | None = Field(None, description="caption for [filewords] (uploaded data only)")


class TrainBody(_Strict):
    name: StrictStr = Field(..., description="the concept to train (an existing pair is continued by default)")
    images: list[TrainImage] = Field(..., description="at least one image: {path} or {data, filename}")
    options: TrainOptions = Field(default_factory=TrainOptions,
                                  description="training options; any left out keep their defaults")
    resume: StrictStr | None = Field(None, description="checkpoint to resume from exactly")
    overwrite: StrictBool = Field(False, description="start the pair afresh, replacing existing files")
    continue_existing: StrictBool = Field(True, description="continue an existing pair from its saved state")
    preview_sampler: StrictStr | None = Field(None, description="sampler for previews (default: the host's)")


class TrainAccepted(BaseModel):
    job_id: str
    status_url: str
    state: str


class JobList(BaseModel):
    jobs: list[JobStatusModel]


class CancelResponse(BaseModel):
    job_id: str
    state: str
    message: str


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorResponse} for code in codes}


# -- handlers -------------------------------------------------------------------------------------------------------


def _bad_request(error: Exception, status: int = 400) -> HTTPException:
    return HTTPException(status_code=status, detail=str(error) or type(error).__name__)


def _checked_name(name: str) -> None:
    try:
        validate_concept_name(name)
    except REQUEST_ERRORS as error:
        raise _bad_request(error) from None


def create_concept(body: CreateConceptRequest):
    from modules import call_queue

    _checked_name(body.name)
    try:
        JOBS.ensure_idle()  # a job holds the queue lock for its whole run: answer now instead of waiting
        with call_queue.queue_lock:  # no generation may run while the embedding database reloads
            written = create_pair(body.name, init_text=body.init_text, positive_vectors=body.positive_vectors,
                                  negative_vectors=body.negative_vectors, overwrite=body.overwrite)
    except BusyError as error:
        raise _bad_request(error, 409) from None
    except REQUEST_ERRORS as error:
        raise _bad_request(error) from None
    return {"name": body.name, "files": [str(p) for p in written]}


def list_concepts():
    return {"concepts": concepts()}


def train(body: TrainBody):
    try:
        JOBS.ensure_idle()
    except BusyError as error:
        raise _bad_request(error, 409) from None
    _checked_name(body.name)
    options = body.options.model_dump(exclude_unset=True) if PYDANTIC_V2 else body.options.dict(exclude_unset=True)
    reserved = sorted({"name", "images"} & set(options))
    if reserved:
        raise _bad_request(ConfigError(f"give {' and '.join(reserved)} at the top level, not in options"))
    if not body.images:
        raise _bad_request(ConfigError("give at least one image"))
    job_id = new_job_id()
    with tempfile.TemporaryDirectory(prefix="dreamartist-upload-") as staging:
        try:
            images, uploaded = _image_sources(body.images, Path(staging))
            config = TrainConfig.from_dict({**options, "name": body.name, "images": images})
            request = TrainRequest(config, resume=body.resume, overwrite=body.overwrite,
                                   continue_existing=body.continue_existing, preview_sampler=body.preview_sampler)
            validated = JOBS.validate(request)
        except BusyError as error:
            raise _bad_request(error, 409) from None
        except REQUEST_ERRORS as error:
            raise _bad_request(ValueError(str(error).replace(staging + "/", "uploaded "))) from None
        kept = None
        if uploaded:  # decoded already; the copies are kept with the job's logs as a record of what it trained on
            kept = validated.prepared.layout.log_dir / "uploads" / job_id
            shutil.copytree(staging, kept)
            kept_images = [str(kept / Path(p).name) if p in uploaded else p for p in images]
            prepared = validated.prepared
            validated = dataclasses.replace(validated, prepared=dataclasses.replace(
                prepared, config=dataclasses.replace(prepared.config, images=kept_images)))
        try:
            JOBS.start(validated, job_id=job_id)
        except BusyError as error:
            if kept is not None:
                shutil.rmtree(kept, ignore_errors=True)
            raise _bad_request(error, 409) from None
    return {"job_id": job_id, "status_url": f"{PREFIX}/jobs/{job_id}", "state": "queued"}


def _image_sources(items: list[TrainImage], staging: Path) -> tuple[list[str], set[str]]:
    """Paths as given, uploads decoded into ``staging``; returns every path and the set of uploaded ones."""
    paths: list[str | None] = []
    uploads: list[Upload] = []
    for index, item in enumerate(items):
        if (item.path is None) == (item.data is None):
            raise ConfigError(f"images[{index}]: give either 'path' or 'data' (base64), not both or neither")
        if item.path is not None:
            if item.filename or item.caption:
                raise ConfigError(f"images[{index}]: 'filename' and 'caption' go with 'data' only")
            paths.append(item.path)
        else:
            paths.append(None)
            uploads.append(Upload(item.data, item.filename, item.caption))
    staged = iter(str(p) for p in stage_uploads(uploads, staging)) if uploads else iter(())
    resolved = [p if p is not None else next(staged) for p in paths]
    return resolved, {p for p, given in zip(resolved, paths, strict=True) if given is None}


def _found(job_id: str) -> JobStatus:
    status = JOBS.status(job_id)
    if status is None:
        raise HTTPException(status_code=404, detail=f"no DreamArtist job {job_id!r} (jobs are kept until restart)")
    return status


def job_status(job_id: str):
    return _found(job_id).as_json()


def list_jobs():
    return {"jobs": [s.as_json() for s in JOBS.recent()]}


def cancel_job(job_id: str):
    _found(job_id)
    if not JOBS.cancel(job_id):
        raise HTTPException(status_code=409, detail=f"job {job_id} has already ended ({_found(job_id).state})")
    status = _found(job_id)
    return {"job_id": job_id, "state": status.state, "message": status.message}


# -- wiring ---------------------------------------------------------------------------------------------------------


def api_credentials(api_auth: str | None) -> dict[str, str]:
    """``user:password[,user2:password2]`` as the host's --api-auth takes it."""
    credentials = {}
    for item in (api_auth or "").split(","):
        if item.strip():
            user, _, password = item.strip().partition(":")
            credentials[user] = password
    return credentials


def auth_dependency(credentials: dict[str, str]) -> Callable[..., None]:
    """The host's own check (modules/api/api.py ``Api.auth``), which extensions cannot reach."""

    def require_credentials(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> None:
        expected = credentials.get(given.username)
        if expected is not None and secrets.compare_digest(given.password.encode(), expected.encode()):
            return
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return require_credentials


ROUTES = (
    # path, method, handler, response model, status, summary, description, error codes
    ("/concepts", "POST", create_concept, CreateConceptResponse, 201, "Create a concept",
     "Writes a step-0 embedding pair `name` / `name-neg` into the host's embeddings folder and loads it. "
     "Training it next (`continue_existing`) starts from these vectors.", (400, 409, 422)),
    ("/concepts", "GET", list_concepts, ConceptList, 200, "List learned concepts",
     "Every DreamArtist pair in the host's embeddings folder, with its adapter files and metadata.", ()),
    ("/train", "POST", train, TrainAccepted, 202, "Start training",
     "Validates everything (name, images, options), then trains in the background on the loaded model, one job "
     "at a time, after any generation in progress. Poll `status_url`; the host's progress bar and "
     "`/sdapi/v1/progress` show the job, and `/sdapi/v1/interrupt` stops it at the next step (it saves).",
     (400, 409, 422)),
    ("/jobs", "GET", list_jobs, JobList, 200, "Recent jobs", "Jobs since the host started, newest first.", ()),
    ("/jobs/{job_id}", "GET", job_status, JobStatusModel, 200, "Job status",
     "State, step, loss values, speed, ETA, files written, previews, error, and whether the model was left "
     "exactly as before (`model_restored`).", (404,)),
    ("/jobs/{job_id}/cancel", "POST", cancel_job, CancelResponse, 200, "Cancel a job",
     "Stops the job at the next step boundary; it then saves its files and ends as `interrupted`.", (404, 409)),
)


def register(_demo, app) -> None:
    """on_app_started callback: add the routes (once per app) behind the host's --api-auth, if set."""
    from modules import shared

    existing = {(getattr(r, "path", None), method) for r in app.routes for method in getattr(r, "methods", ())}
    credentials = api_credentials(getattr(shared.cmd_opts, "api_auth", None))
    dependencies = [Depends(auth_dependency(credentials))] if credentials else []
    for path, method, handler, model, status, summary, description, error_codes in ROUTES:
        if (PREFIX + path, method) in existing:
            continue
        app.add_api_route(PREFIX + path, handler, methods=[method], response_model=model, status_code=status,
                          summary=summary, description=description, tags=TAGS, dependencies=dependencies,
                          responses=_errors(*error_codes, *((401,) if credentials else ())))

"""The DreamArtist HTTP API on the real host: create a pair, train it as a host job (progress, one job at a time,
cancel and Interrupt save at a step), the host loads what was written, bad requests are 4xx and write nothing, the
model is left bit-for-bit as before (cancelled and failed runs included), and --api-auth protects the routes."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from webui_host import REPO, mentions_us, png_b64, start_webui, tracebacks

NAME = "dacube"
API = "/dreamartist/v1"


# -- helpers -----------------------------------------------------------------------------------------------------


def tiny_options(**overrides) -> dict:
    """The cheapest real run: 64x64, rank-1 adapters on both parts, no previews or intermediate saves."""
    options = {"width": 64, "height": 64, "steps": 200, "save_every": 0, "preview_every": 0,
               "unet_rank": 1, "text_rank": 1, "reconstruction_weight": 0.0}
    options.update(overrides)
    return options


def txt2img(host, prompt: str = "a red cube on a table", negative: str = "", seed: int = 11) -> tuple[bytes, str]:
    status, body = host.post("/sdapi/v1/txt2img", {
        "prompt": prompt, "negative_prompt": negative, "steps": 2, "width": 64, "height": 64, "seed": seed,
        "sampler_name": "Euler", "scheduler": "Automatic"})
    assert status == 200, body
    return base64.b64decode(body["images"][0]), json.loads(body["info"])["infotexts"][0]


def wait_for_job(host, job_id: str, until, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while True:
        status, job = host.get(f"{API}/jobs/{job_id}")
        assert status == 200, job
        if until(job):
            return job
        assert job["state"] in ("queued", "running"), job  # ended without reaching the condition
        assert time.time() < deadline, f"job {job_id} did not get there in {timeout:.0f} s: {job}"
        time.sleep(0.25)


def ended(job: dict) -> bool:
    return job["state"] not in ("queued", "running")


def embedding_step(path: str | Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int(handle.metadata()["step"])


def folder_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the host's data folders we might write to, with size and mtime."""
    out = {}
    for folder in ("embeddings", "models/Lora", "dreamartist"):
        base = root / folder
        if base.exists():
            for path in base.rglob("*"):
                if path.is_file():
                    stat = path.stat()
                    out[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def host(webui):
    return webui


@pytest.fixture(scope="module")
def log_start(host) -> int:
    """Where this module's part of the shared host's log begins."""
    return len(host.log())


@pytest.fixture(scope="module")
def baseline(host, log_start) -> bytes:
    """A fixed-seed image made before any DreamArtist job touched this host."""
    return txt2img(host)[0]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "cube.png"
    path.write_bytes(base64.b64decode(png_b64((80, 64), seed=3)))
    return path


# -- tests (in order: they build on each other's host state) ----------------------------------------------------


def test_routes_are_documented_in_openapi(host, baseline):
    status, spec = host.get("/openapi.json")
    assert status == 200
    paths = spec["paths"]
    for path, method, code in ((f"{API}/concepts", "post", "201"), (f"{API}/concepts", "get", "200"),
                               (f"{API}/train", "post", "202"), (f"{API}/jobs", "get", "200"),
                               (f"{API}/jobs/{{job_id}}", "get", "200"),
                               (f"{API}/jobs/{{job_id}}/cancel", "post", "200")):
        operation = paths[path][method]
        assert operation["tags"] == ["DreamArtist"] and operation["summary"] and operation["description"]
        assert code in operation["responses"]
    assert {"400", "409", "422"} <= set(paths[f"{API}/train"]["post"]["responses"])


def test_create_a_pair_and_list_it(host):
    status, body = host.post(f"{API}/concepts", {"name": NAME, "init_text": "cube", "positive_vectors": 2,
                                                 "negative_vectors": 2})
    assert status == 201, body
    assert sorted(Path(p).name for p in body["files"]) == [f"{NAME}-neg.safetensors", f"{NAME}.safetensors"]
    assert all(Path(p).parent == host.data_dir / "embeddings" for p in body["files"])
    loaded = host.get("/sdapi/v1/embeddings")[1]["loaded"]
    assert loaded[NAME]["vectors"] == 2 and loaded[f"{NAME}-neg"]["vectors"] == 2
    concepts = {c["name"]: c for c in host.get(f"{API}/concepts")[1]["concepts"]}
    assert concepts[NAME]["step"] == 0 and concepts[NAME]["loaded"] and not concepts[NAME]["has_adapters"]
    assert concepts[NAME]["negative_name"] == f"{NAME}-neg"

    status, body = host.post(f"{API}/concepts", {"name": NAME})
    assert status == 400 and "already exists" in body["detail"], body
    status, body = host.post(f"{API}/concepts", {"name": "DACube"})
    assert status == 400 and "clashes with the existing embedding" in body["detail"], body


def _bad_train_requests(image_file: Path, data_dir: Path) -> list[tuple[str, dict, int, str]]:
    good_image = {"path": str(image_file)}

    def train(name=NAME, images=None, **options):
        return {"name": name, "images": images or [good_image], "options": tiny_options(**options)}

    small = base64.b64encode(base64.b64decode(png_b64((32, 32)))).decode()
    return [
        ("name with /", train(name="da/cube"), 400, "path separator"),
        ("name with ..", train(name="da..cube"), 400, "'..'"),
        ("missing image file", train(images=[{"path": str(data_dir / "nope.png")}]), 400, "does not exist"),
        ("broken base64", train(images=[{"data": "%%% not base64 %%%", "filename": "x.png"}]), 400,
         "not valid base64"),
        ("bytes that are no image", train(images=[{"data": base64.b64encode(b"GIF89a? no").decode()}]), 400,
         "not an image"),
        ("image too small", train(images=[{"data": small, "filename": "small.png"}]), 400, "uploaded small.png"),
        ("path and data", train(images=[{"path": str(image_file), "data": small}]), 400, "either 'path' or 'data'"),
        ("no images", {"name": NAME, "images": [], "options": tiny_options()}, 400, "at least one image"),
        ("unknown option", train(stepz=3), 400, "unknown option(s): stepz"),
        ("lr schedule syntax", train(embedding_lr="0.005:abc"), 400, "embedding learning rate"),
        ("steps 'abc'", train(steps="abc"), 400, "'steps' must be a whole number"),
        ("width not a multiple", train(width=60), 400, "width 60 must be a positive multiple"),
        ("unknown template", train(template="nope"), 400, "unknown prompt template"),
        ("bad adam betas", train(adam_betas=[0.9]), 400, "adam_betas"),
        ("preview not an object", train(preview=5), 400, "'preview' must be an object"),
        ("name clash", train(name="DACUBE"), 400, "clashes with the existing embedding"),
        ("name in options", {"name": NAME, "images": [good_image], "options": {"name": "x"}}, 400,
         "at the top level"),
        ("missing checkpoint", {**train(), "resume": str(data_dir / "nope.safetensors")}, 400, "does not exist"),
        ("unknown preview sampler", {**train(), "preview_sampler": "Nope"}, 400, "unknown preview sampler"),
        ("unknown field", {**train(), "colour": "red"}, 422, ""),
        ("no name", {"images": [good_image]}, 422, ""),
        ("overwrite as text", {**train(), "overwrite": "yes"}, 422, ""),
    ]


def test_bad_requests_are_4xx_with_a_message_and_write_nothing(host, image_file):
    before = folder_snapshot(host.data_dir)
    failures = []
    for label, body, expected, fragment in _bad_train_requests(image_file, host.data_dir):
        status, answer = host.post(f"{API}/train", body)
        detail = json.dumps(answer)
        if status != expected or fragment not in detail:
            failures.append(f"{label}: {status} {detail[:300]}")
    for label, body, expected, fragment in [
        ("concept name with ..", {"name": ".."}, 400, "invalid concept name"),
        ("concept vectors 0", {"name": "dasphere", "positive_vectors": 0}, 400, "between 1 and 75"),
        ("concept vectors as text", {"name": "dasphere", "positive_vectors": "3"}, 422, ""),
    ]:
        status, answer = host.post(f"{API}/concepts", body)
        if status != expected or fragment not in json.dumps(answer):
            failures.append(f"{label}: {status} {json.dumps(answer)[:300]}")
    assert not failures, "\n".join(failures)
    assert host.get(f"{API}/jobs/nope")[0] == 404
    assert host.post(f"{API}/jobs/nope/cancel")[0] == 404
    assert host.get(f"{API}/jobs")[1] == {"jobs": []}  # nothing was started
    assert folder_snapshot(host.data_dir) == before


def test_train_shows_progress_is_exclusive_and_cancel_saves_at_that_step(host, image_file, baseline):
    log_at_start = len(host.log())
    upload = {"data": png_b64((64, 64), seed=5), "filename": "cube.png", "caption": "a red cube"}
    options = tiny_options(reconstruction_weight=1.0, preview_every=2,
                           preview={"prompt": "a photo of [name]", "steps": 2})
    status, accepted = host.post(f"{API}/train", {"name": NAME, "images": [upload], "options": options})
    assert status == 202, accepted
    job_id = accepted["job_id"]
    assert accepted["status_url"] == f"{API}/jobs/{job_id}"

    job = wait_for_job(host, job_id, lambda j: j["step"] >= 2 and j["previews"])
    assert job["state"] == "running" and job["total"] == 200 and job["name"] == NAME
    assert job["attention"] == "sdp"  # the host runs InvokeAI on CPU; training switches to its sdp for the job
    assert job["values"]["loss"] > 0 and job["steps_per_second"] > 0 and job["eta_seconds"] > 0
    assert job["message"].startswith("step ") and "loss" in job["message"] and "ETA" in job["message"]
    progress = host.get("/sdapi/v1/progress")[1]
    assert progress["state"]["job"] == "dreamartist" and progress["state"]["job_count"] == 200
    assert progress["state"]["job_no"] >= 2 and progress["textinfo"].startswith("step ")
    assert progress["current_image"], "the preview should be the host's current image"

    status, busy = host.post(f"{API}/train", {"name": "dasphere", "images": [{"path": str(image_file)}],
                                              "options": tiny_options()})
    assert status == 409 and job_id in busy["detail"], busy
    status, busy = host.post(f"{API}/concepts", {"name": "dasphere"})
    assert status == 409, busy
    assert host.get(f"{API}/jobs")[1]["jobs"][0]["id"] == job_id

    status, answer = host.post(f"{API}/jobs/{job_id}/cancel")
    assert status == 200 and answer["job_id"] == job_id, answer
    job = wait_for_job(host, job_id, ended)
    step = job["step"]
    assert job["state"] == "interrupted" and 2 <= step < 200, job
    assert job["model_restored"] is True and job["error"] is None and job["finished_at"] >= job["started_at"]
    applied = host.log()[log_at_start:].split("Applying attention optimization: ")[1:]
    switches = [line.split("...")[0] for line in applied]
    assert switches == ["sdp", "InvokeAI"]  # and back to the host's choice (model_restored checks it too)
    written = {Path(p).name: p for p in job["files"]}
    assert {f"{NAME}.safetensors", f"{NAME}-neg.safetensors", f"{NAME}-{step:06d}.safetensors"} <= set(written)
    assert embedding_step(written[f"{NAME}.safetensors"]) == step
    assert embedding_step(host.data_dir / "models" / "Lora" / "dreamartist" / f"{NAME}.safetensors") == step
    assert Path(job["loss_plot"]).is_file() and all(Path(p).is_file() for p in job["previews"])
    assert host.post(f"{API}/jobs/{job_id}/cancel")[0] == 409
    uploads = host.data_dir / "dreamartist" / NAME / "uploads" / job_id
    assert (uploads / "cube.txt").read_text() == "a red cube" and (uploads / "cube.png").is_file()

    # the host loaded what the job wrote, and the model is exactly as before
    loaded = host.get("/sdapi/v1/embeddings")[1]["loaded"]
    assert {NAME, f"{NAME}-neg"} <= set(loaded)
    loras = {item["name"]: item for item in host.get("/sdapi/v1/loras")[1]}
    assert {NAME, f"{NAME}-neg"} <= set(loras)
    assert Path(loras[NAME]["path"]).parent.name == "dreamartist"
    assert txt2img(host)[0] == baseline
    _, infotext = txt2img(host, f"a photo of {NAME}", f"{NAME}-neg")
    hashes = infotext.split("TI hashes: ")[1]
    assert f"{NAME}: " in hashes and f"{NAME}-neg: " in hashes, infotext
    concept = next(c for c in host.get(f"{API}/concepts")[1]["concepts"] if c["name"] == NAME)
    assert concept["step"] == step and concept["has_adapters"] and concept["files"]["negative_lora"]


def test_host_interrupt_stops_a_continued_run_and_it_saves(host, baseline):
    """Also: the previous generation merged a LoRA into the weights; the job starts from the base model and
    still reports the model as restored, and generation without the LoRA gives the baseline again."""
    with_lora, infotext = txt2img(host, f"a red cube on a table <lora:{NAME}:1>")
    assert "Lora hashes" in infotext and with_lora != baseline
    start_step = next(c for c in host.get(f"{API}/concepts")[1]["concepts"] if c["name"] == NAME)["step"]
    image = next((host.data_dir / "dreamartist" / NAME / "uploads").glob("*/cube.png"))
    status, accepted = host.post(f"{API}/train", {"name": NAME, "images": [{"path": str(image)}],
                                                  "options": tiny_options()})
    assert status == 202, accepted
    job_id = accepted["job_id"]
    wait_for_job(host, job_id, lambda j: j["step"] >= start_step + 1)
    assert host.post("/sdapi/v1/interrupt")[0] == 200  # the host's Interrupt button
    job = wait_for_job(host, job_id, ended)
    assert job["state"] == "interrupted" and job["step"] > start_step and job["model_restored"] is True, job
    assert embedding_step(host.data_dir / "embeddings" / f"{NAME}.safetensors") == job["step"]
    assert txt2img(host)[0] == baseline


def test_install_py_changes_nothing_on_a_host_that_has_everything(host_setup):
    env = {**host_setup.env(), "PYTHONPATH": str(host_setup.webui)}
    done = subprocess.run([str(host_setup.python), str(REPO / "install.py")], cwd=str(host_setup.webui), env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", (done.stdout, done.stderr)


def test_api_auth_and_a_failed_run_that_leaves_the_model_as_it_was(host_setup, tmp_path, image_file):
    """A second host with --api-auth: 401 without (or with wrong) credentials, 200/202 with them. On it, a run
    that fails mid-way (a folder where its first checkpoint must go) ends "failed" with the reason, puts the model
    back exactly, and the host keeps generating the same pictures."""
    data_dir = tmp_path / "auth-data"
    auth_host = start_webui(host_setup, data_dir, ["--api-auth", "alice:s3cret,bob:pw"], auth=("bob", "pw"))
    try:
        assert auth_host.get(f"{API}/jobs", auth=None)[0] == 401
        assert auth_host.get(f"{API}/jobs", auth=("bob", "wrong"))[0] == 401
        assert auth_host.post(f"{API}/train", {"name": "x"}, auth=None)[0] == 401
        assert auth_host.get(f"{API}/jobs", auth=("alice", "s3cret"))[0] == 200
        assert auth_host.get(f"{API}/jobs")[0] == 200
        before = txt2img(auth_host)[0]

        (data_dir / "dreamartist" / "dafail" / "checkpoints" / "dafail-000001.safetensors").mkdir(parents=True)
        status, accepted = auth_host.post(f"{API}/train", {"name": "dafail", "images": [{"path": str(image_file)}],
                                                           "options": tiny_options(steps=3, save_every=1)})
        assert status == 202, accepted
        job = wait_for_job(auth_host, accepted["job_id"], ended)
        assert job["state"] == "failed" and job["step"] == 1, job
        assert "IsADirectoryError" in job["error"] and "dafail-000001.safetensors" in job["error"], job
        assert job["model_restored"] is True
        assert txt2img(auth_host)[0] == before

        status, accepted = auth_host.post(f"{API}/train", {"name": "daauth", "images": [{"path": str(image_file)}],
                                                           "options": tiny_options(steps=2, unet_rank=0,
                                                                                   text_rank=0)})
        assert status == 202, accepted
        job = wait_for_job(auth_host, accepted["job_id"], ended)
        assert job["state"] == "finished" and job["step"] == 2 and job["model_restored"] is True, job
        assert "daauth" in auth_host.get("/sdapi/v1/embeddings")[1]["loaded"]
        assert txt2img(auth_host)[0] == before
    finally:
        auth_host.stop()
    runtime = auth_host.log().split("Model loaded in", 1)[1]  # what happened while the tests used the host
    blocks = tracebacks(runtime)
    assert len(blocks) == 1 and "IsADirectoryError" in blocks[0], "\n\n".join(blocks)  # the failed job's report
    assert "dafail) failed" in runtime


def test_the_host_log_has_no_warning_or_traceback_of_ours(host, log_start):
    assert txt2img(host)[0]  # still serving
    log = host.log()[log_start:]
    assert tracebacks(log) == [], log[-4000:]
    ours = [line for line in log.splitlines()
            if (mentions_us(line) or "autocorrection" in line.lower())
            and any(word in line.lower() for word in ("warn", "error", "traceback", "failed", "autocorrection"))]
    assert ours == [], ours

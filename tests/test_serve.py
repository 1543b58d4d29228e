"""The Serve application over real HTTP: a real local Serve, a really trained model, real image bytes."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import free_ports, jpeg_bytes
from tests.web_page import (  # noqa: F401 - the web page's tests run here, on this module's Serve
    WEB_KEY,
    browser,
    test_bad_file_shows_error,
    test_http_api_reports_each_files_provenance_exactly,
    test_page_asks_for_the_api_key_when_the_server_needs_one,
    test_signed_image_shows_provenance_beside_the_verdict,
    test_unfamiliar_photo_shows_no_verdict_and_why,
    test_upload_shows_verdict_and_heatmap,
)

REPO = Path(__file__).resolve().parent.parent
MAX_BODY = 256 * 1024


def free_port() -> int:
    return free_ports(1)[0]


def wait_healthy(url: str, timeout: float = 180) -> dict:
    """Poll /healthz until the app answers 200 (the proxy says 404/503 while deploying)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=10)
            if r.status_code == 200:
                return r.json()
            last = r.status_code
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.5)
    raise AssertionError(f"{url} not healthy after {timeout}s (last: {last})")


def serve_args(model_dir: Path, **kw) -> dict:
    """Small logical CPU shares so the apps fit the 2-CPU test cluster; one replica each."""
    one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}}
    return {
        "model": str(model_dir),
        "device": "cpu",
        "detector_num_cpus": 0.4,
        "explainer_num_cpus": 0.2,
        "max_body_bytes": MAX_BODY,
        "explainer_options": dict(one),
        "ingress_options": dict(one),
        **kw,
    }


def tiny_args(model_dir: Path) -> dict:
    """The `tiny` app: one image at a time and one queue slot (overload gives 503), no explainer; the rolling
    swap redeploys it with another model."""
    return serve_args(
        model_dir,
        max_batch_size=1,
        max_queued_images=1,
        warmup=False,
        explain=False,
        detector_num_cpus=0.2,
        explainer_num_cpus=0.1,
        # the old replicas have nothing long to drain here
        ingress_options={**serve_args(model_dir)["ingress_options"], "graceful_shutdown_timeout_s": 5},
    )


API_KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def app_url(ray_local, trained_model_dir, model_zoo, tmp_path_factory):
    from ray import serve

    from deepfake.serve import build_app

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"tester:{API_KEY}\nweb:{WEB_KEY}\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            serve_args(trained_model_dir, max_batch_size=16, batch_wait_timeout_s=0.05, models_dir=str(model_zoo))
        ),
        name="deepfake",
        route_prefix="/",
        blocking=False,
    )
    # A second app under a prefix with a one-slot model queue: overload must give 503, not memory growth.
    serve.run(build_app(tiny_args(trained_model_dir)), name="tiny", route_prefix="/tiny", blocking=False)
    # A third one that needs an API key and allows 1 request/s per key, 3 at once.
    serve.run(
        build_app(
            serve_args(
                trained_model_dir,
                warmup=False,
                explain=False,
                detector_num_cpus=0.1,
                api_keys_file=str(keys),
                rate_limit=1.0,
                rate_burst=3,
            )
        ),
        name="locked",
        route_prefix="/locked",
        blocking=False,
    )
    url = f"http://127.0.0.1:{port}"
    for prefix in ("", "/tiny", "/locked"):
        wait_healthy(url + prefix)
    yield url
    serve.shutdown()


@pytest.fixture()
def web_url(app_url):
    return app_url  # the web page's tests name the model they want: /?model=calibrated (tests/web_page.py)


@pytest.fixture()
def locked_url(app_url):
    return app_url + "/locked"


# ---------------------------------------------------------------------------------------------- pure parts
def test_config_file_folds_deployments_into_args(tmp_path):
    from deepfake.config import ConfigError
    from deepfake.serve import ServeArgs, gpu_shares, load_serve_config

    spec = load_serve_config(REPO / "serve_config.yaml", model=str(tmp_path), port=1234)
    args = ServeArgs.model_validate(spec["args"])
    assert args.model == str(tmp_path) and spec["http_options"]["port"] == 1234
    assert args.ingress_options["max_ongoing_requests"] >= args.max_batch_size
    assert args.ingress_options["autoscaling_config"]["max_replicas"] >= 2
    assert "max_queued_requests" in args.ingress_options and args.max_queued_images >= args.max_batch_size
    assert (spec["name"], spec["route_prefix"]) == ("deepfake", "/")
    assert gpu_shares(args, 0) == (0.0, 0.0)
    det, exp = gpu_shares(args, 1)
    assert 0 < det < 1 and 0 < exp < 1 and 2 * det + exp <= 1
    assert gpu_shares(args.model_copy(update={"num_gpus": 1.0, "explainer_num_gpus": 0.0}), 1) == (1.0, 0.0)

    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - import_path: deepfake.serve:app_builder\n    deployments:\n      - name: Nope\n")
    with pytest.raises(ConfigError, match="Nope"):
        load_serve_config(bad)
    bad.write_text("applications:\n  - import_path: x\n    args: {max_batch_size: 0}\n")
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_serve_config(bad)
    bad.write_text("applications:\n  - import_path: x\n    args: {ingress_num_cpus: 0.1}\n")  # a setting of old
    with pytest.raises(ConfigError, match="ingress_num_cpus"):
        load_serve_config(bad)


def test_missing_model_is_a_clear_error(tmp_path):
    from deepfake.checkpoint import CheckpointError
    from deepfake.cli import main
    from deepfake.serve import build_app

    with pytest.raises(CheckpointError, match="model=DIR|--model DIR"):
        build_app({"model": str(tmp_path / "nope")})
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2


def test_http_helpers():
    from deepfake.ingress import error_status, route_path, wants_json

    assert wants_json("", None) is False and wants_json("image/png", None) is False
    assert wants_json("application/json", None) is True and wants_json("image/png", "json") is True
    assert wants_json("application/json, image/png", None) is False
    assert [error_status(r) for r in ("empty", "not_an_image", "truncated", "corrupt", "decompression_bomb")] == [
        400,
        415,
        400,
        400,
        413,
    ]
    assert route_path({"path": "/tiny/predict", "root_path": "/tiny"}) == "/predict"
    assert route_path({"path": "/", "root_path": ""}) == "/" and route_path({"path": "/healthz/"}) == "/healthz"


def test_forward_merger_joins_what_arrives_while_the_model_runs():
    """Submissions made during a call go into the next call together (up to max_items, whole submissions);
    every caller gets its own results; a failing call fails only its callers; a cancelled caller does not
    stall the others."""
    from deepfake.detector import ForwardMerger

    calls: list[list[int]] = []

    def slow(items: list[int]) -> list[int]:
        calls.append(list(items))
        time.sleep(0.2)
        if -1 in items:
            raise ValueError("bad item")
        return [x * 10 for x in items]

    merger = ForwardMerger(slow, max_items=8)

    async def submit(items: list[int], delay: float = 0.0):
        await asyncio.sleep(delay)
        return await merger.submit(items)

    async def scenario():
        # one call starts at once; 12 single items and one pair arrive while it runs
        jobs = [submit([0])] + [submit([i], 0.05 + 0.005 * i) for i in range(1, 13)] + [submit([20, 21], 0.12)]
        results = await asyncio.gather(*jobs)
        assert [r for r, _ in results] == [[0]] + [[i * 10] for i in range(1, 13)] + [[200, 210]]
        assert calls == [[0], [1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 20, 21]]
        assert [n for _, n in results] == [1] + [8] * 8 + [6] * 5
        # a failing call: its callers get the error; the next submission is served
        failed, after = await asyncio.gather(submit([-1]), submit([5], 0.05), return_exceptions=True)
        assert isinstance(failed, ValueError) and after == ([50], 1), (failed, after)
        assert (await submit([7]))[0] == [70]
        # a caller cancelled mid-call: the call finishes and the caller waiting behind it is served
        first = asyncio.create_task(submit([1]))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(submit([2]))
        await asyncio.sleep(0.01)
        first.cancel()
        assert (await asyncio.wait_for(second, 5))[0] == [20]

    asyncio.run(scenario())
    assert merger.items == sum(len(c) for c in calls if -1 not in c)
    assert merger.pass_sizes[8] == 1 and merger.busy_s > 0


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sample_image(sample_dir: Path, label: str = "FAKE", i: int = 0) -> Path:
    return sorted((sample_dir / label).iterdir())[i]


@pytest.mark.slow
def test_predict_raw_body(app_url, sample_dir, trained_model_dir):
    from deepfake.inference import Predictor

    path = sample_image(sample_dir)
    r = httpx.post(f"{app_url}/predict?filename={path.name}", content=path.read_bytes(), timeout=60)
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert res["filename"] == path.name
    assert res["label"] in ("ai", "real") and 0.0 <= res["prob_ai"] <= 1.0
    assert res["latency_ms"] > 0 and (res["width"], res["height"]) == (32, 32)
    # the server's verdict is the in-process Predictor's verdict for the same bytes
    from deepfake.images import decode_image

    local = Predictor.from_dir(trained_model_dir, device="cpu").predict_images([decode_image(path.read_bytes())])[0]
    assert res["label"] == local["label"] and res["model"] == local["model"]
    assert res["prob_ai"] == pytest.approx(local["prob_ai"], abs=1e-4)
    # every answer says how far it can be trusted; this folder has no guard fitted
    assert res["verdict"] == local["verdict"] and res["in_domain"] is None and res["domain_score"] is None
    assert res["prob_ai_raw"] == pytest.approx(local["prob_ai_raw"], abs=1e-4) and res["operating_point"] == "0.5"


def test_a_large_jpeg_is_answered_with_its_own_size_and_the_cli_verdict(app_url, model_zoo):
    """A 1600x1200 photo: the server decodes it reduced (JPEG draft), answers with the file's own size, and
    its verdict is the one the CLI's Predictor gives for the same bytes (guard included)."""
    from skimage import data

    from deepfake.images import decode_image
    from deepfake.inference import load_scorer

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((1600, 1200)).save(buf, format="JPEG", quality=60)
    assert len(buf.getvalue()) < MAX_BODY
    r = httpx.post(f"{app_url}/predict?model=calibrated", content=buf.getvalue(), timeout=60)
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert (res["width"], res["height"]) == (1600, 1200)
    local = load_scorer(model_zoo / "calibrated", device="cpu").predict_images([decode_image(buf.getvalue())])[0]
    assert res["prob_ai"] == pytest.approx(local["prob_ai"], abs=1e-4)
    assert res["verdict"] == local["verdict"] and res["in_domain"] == local["in_domain"] is False


@pytest.mark.slow
def test_predict_multipart_many_files(app_url, sample_dir, trained_model_dir):
    paths = [sample_image(sample_dir, "FAKE", i) for i in range(3)] + [
        sample_image(sample_dir, "REAL", i) for i in range(3)
    ]
    # odd modes are converted, not refused: grayscale PNG and RGBA PNG next to the JPEGs
    gray = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8), "L"))
    rgba = png_bytes(Image.new("RGBA", (20, 30), (10, 200, 30, 128)))
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    files += [("files", ("gray.png", gray, "image/png")), ("files", ("rgba.png", rgba, "image/png"))]
    r = httpx.post(f"{app_url}/predict", files=files, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [p.name for p in paths] + ["gray.png", "rgba.png"]
    assert (results[-2]["width"], results[-2]["height"]) == (50, 40)
    # each file gets exactly the verdict the in-process Predictor gives it (one inference path)
    from deepfake.images import decode_image
    from deepfake.inference import Predictor

    local = Predictor.from_dir(trained_model_dir, device="cpu").predict_images([decode_image(f[1][1]) for f in files])
    assert [x["label"] for x in results] == [v["label"] for v in local]
    assert np.allclose([x["prob_ai"] for x in results], [v["prob_ai"] for v in local], atol=1e-4)


@pytest.mark.slow
def test_explain_png_and_json(app_url, sample_dir, trained_model_dir):
    data = sample_image(sample_dir).read_bytes()
    r = httpx.post(f"{app_url}/explain", content=data, headers={"Accept": "image/png"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(r.content))
    assert overlay.size == (32, 32) and overlay.mode == "RGB"
    assert r.headers["x-label"] in ("ai", "real") and r.headers["x-target"] == r.headers["x-label"]
    assert 0 <= float(r.headers["x-prob-ai"]) <= 1

    r = httpx.post(f"{app_url}/explain?format=json&target=real", files={"f": ("a.jpg", data)}, timeout=120)
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert res["filename"] == "a.jpg" and res["target"] == "real"
    assert Image.open(io.BytesIO(base64.b64decode(res["overlay_png_base64"]))).size == (32, 32)
    # Accept: application/json alone also selects JSON
    r = httpx.post(f"{app_url}/explain", content=data, headers={"Accept": "application/json"}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    # the overlay of a non-square image comes back at the original size
    wide = png_bytes(Image.new("RGB", (64, 24), (200, 30, 30)))
    r = httpx.post(f"{app_url}/explain", content=wide, timeout=120)
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 24)
    import skimage.data

    from deepfake.images import decode_image
    from deepfake.inference import scorer_info

    # a 4.3 Mpx photo: the Explainer receives the image as the model reads it, never the decoded photo
    photo = Image.fromarray(skimage.data.astronaut()).resize((2400, 1800), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=50)
    r = httpx.post(f"{app_url}/explain?format=json", content=buf.getvalue(), timeout=120)
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert (res["width"], res["height"]) == (2400, 1800)
    overlay = Image.open(io.BytesIO(base64.b64decode(res["overlay_png_base64"])))
    assert overlay.size == decode_image(buf.getvalue()).size == (600, 450)  # JPEG draft decoding at 1/4
    side = scorer_info(trained_model_dir)["metas"][0]["image_size"]
    shipped = httpx.get(f"{app_url}/stats", timeout=30).json()["explainer"]["largest_input_bytes"]
    assert 0 < shipped <= side * side * 3, shipped


def _bomb() -> bytes:
    # 8000 x 8000 1-bit PNG: a few kB on the wire, 64 Mpx (192 MB as RGB) once decoded
    return png_bytes(Image.new("1", (8000, 8000)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,body,status,error",
    [
        ("empty", b"", 400, "empty"),
        ("text", b"hello, this is not an image at all", 415, "not_an_image"),
        ("truncated", jpeg_bytes(1, size=64)[:300], 400, "truncated"),
        ("bomb", None, 413, "decompression_bomb"),
        ("too_large", os.urandom(MAX_BODY + 10), 413, "body_too_large"),
    ],
)
def test_bad_inputs_are_json_errors(app_url, name, body, status, error):
    body = _bomb() if body is None else body
    for route in ("predict", "explain"):
        r = httpx.post(f"{app_url}/{route}", content=body, timeout=60)
        assert r.status_code == status, (route, r.text)
        assert r.headers["content-type"] == "application/json"
        err = r.json()
        assert err["error"] == error and "Traceback" not in r.text
    # a bad file in a multipart upload is named
    r = httpx.post(f"{app_url}/predict", files=[("f", ("good.jpg", jpeg_bytes(2))), ("f", (f"{name}.bin", body))])
    assert r.status_code == status and r.json()["error"] == error
    if error != "body_too_large":  # refused before parsing: no per-file report
        assert r.json()["files"] == [
            {"filename": f"{name}.bin", "reason": error, "detail": r.json()["files"][0]["detail"]}
        ]


@pytest.mark.slow
def test_routing_and_form_errors(app_url):
    assert httpx.get(f"{app_url}/nope").status_code == 404
    r = httpx.get(f"{app_url}/predict")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    r = httpx.post(f"{app_url}/predict", files={"x": (None, b"just a field")})  # multipart, no file part
    assert r.status_code == 400 and r.json()["error"] == "no_file"
    r = httpx.post(f"{app_url}/explain?target=cat", content=jpeg_bytes(3))
    assert r.status_code == 400 and r.json()["error"] == "bad_target"
    r = httpx.post(f"{app_url}/explain", files=[("f", ("a.jpg", jpeg_bytes(1))), ("f", ("b.jpg", jpeg_bytes(2)))])
    assert r.status_code == 400 and r.json()["error"] == "one_image_for_png"


@pytest.mark.slow
def test_model_card_page_and_health(app_url, trained_model_dir):
    from deepfake.checkpoint import read_metadata

    resp = httpx.get(f"{app_url}/model")
    card = resp.json()
    meta = read_metadata(trained_model_dir)
    assert card["meta"]["arch"] == meta["arch"] and card["meta"]["classes"] == ["ai", "real"]
    assert "path" not in card and str(Path(trained_model_dir).parent) not in resp.text  # no server paths
    page = httpx.get(f"{app_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for r in (resp, page, httpx.get(f"{app_url}/nope")):
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    assert 'id="file"' in page.text and "explain" in page.text
    assert httpx.get(f"{app_url}/healthz").json() == {"status": "ok", "model": card["version"]}
    # FastAPI's schema and its page: every route, its models and error shape, the upload body, the key schemes
    schema = httpx.get(f"{app_url}/openapi.json").json()
    assert {"/predict", "/explain", "/healthz", "/model", "/models", "/stats"} <= set(schema["paths"])
    predict = schema["paths"]["/predict"]["post"]
    assert {"multipart/form-data", "image/*"} <= set(predict["requestBody"]["content"])
    assert {"200", "401", "413", "415", "429", "503"} <= set(predict["responses"])
    assert {"Verdict", "ErrorBody"} <= set(schema["components"]["schemas"])
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])
    docs = httpx.get(f"{app_url}/docs")
    assert (
        docs.status_code == 200
        and "/openapi.json" in docs.text
        and "frame-ancestors 'none'" in docs.headers["Content-Security-Policy"]
    )


@pytest.mark.slow
def test_concurrent_requests_are_batched(app_url, sample_dir):
    paths = sorted((sample_dir / "FAKE").iterdir())[:16]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{app_url}/predict", content=p.read_bytes()) for p in paths))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 16
    sizes = [r.json()["results"][0]["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes
    stats = httpx.get(f"{app_url}/stats").json()
    assert stats["detector"]["max_batch_size"] > 1
    assert stats["detector"]["images"] >= 16


@pytest.mark.slow
def test_overload_gives_503_json_and_server_survives(app_url):
    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(client.post(f"{app_url}/tiny/predict", content=jpeg_bytes(i, size=256)) for i in range(24))
            )

    responses = asyncio.run(fire())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503}, codes
    assert 503 in codes and 200 in codes, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.json()["error"] == "overloaded" and rejected.headers["retry-after"] == "1"
    # both apps are still up and answering after every bad input and the overload
    assert httpx.post(f"{app_url}/tiny/predict", content=jpeg_bytes(5)).status_code == 200
    r = httpx.post(f"{app_url}/tiny/explain", content=jpeg_bytes(5))  # that app was built with explain=False
    assert r.status_code == 501 and r.json()["error"] == "explain_disabled"
    assert httpx.post(f"{app_url}/predict", content=jpeg_bytes(6)).status_code == 200
    assert wait_healthy(app_url, timeout=10)["status"] == "ok"


# ---------------------------------------------------------------------------------------------- serve deploy
class Traffic:
    """Clients posting the same image in a loop while a model is swapped or a replica killed: every status
    (0: the connection failed), and the models that answered (neither may fail a single request)."""

    def __init__(self, url: str, body: bytes, clients: int = 1, pause: float = 0.1):
        import threading

        self.url, self.body, self.pause = url, body, pause
        self.codes: list[int] = []
        self.models: set[str] = set()
        self.failures: list[tuple[int, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                try:
                    r = c.post(self.url, content=self.body)
                except httpx.HTTPError as e:  # a dropped connection is a failed request too
                    self.codes.append(0)
                    self.failures.append((0, repr(e)))
                    continue
                self.codes.append(r.status_code)
                if r.status_code == 200:
                    self.models.add(r.json()["results"][0]["model"])
                else:
                    self.failures.append((r.status_code, r.text[:300]))
                time.sleep(self.pause)

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)

    def wait_for_model(self, marker: str, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while not any(marker in m for m in self.models) and time.monotonic() < deadline:
            time.sleep(0.5)

    def assert_swapped_without_failure(self, marker: str) -> None:
        assert any(marker in m for m in self.models), self.models
        counts = {c: self.codes.count(c) for c in set(self.codes)}
        assert self.codes and set(self.codes) == {200}, (counts, self.failures)


def _config_copy(dest: Path, model_dir: Path, port: int, min_replicas: int | None = None) -> Path:
    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    # no Explainer: `deepfake serve`'s process test does not explain, and it starts the app twice
    app["args"].update(model=str(model_dir), device="cpu", detector_num_cpus=0.5, explain=False)
    if min_replicas is not None:
        ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
        ingress["autoscaling_config"]["min_replicas"] = min_replicas
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def _model_copy(src: Path, dest: Path, created: str) -> Path:
    """The same weights under another version string, so a redeploy visibly swaps the model."""
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["deepfake"]["created"] = created
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_rolling_model_swap_behind_serves_proxy(app_url, trained_model_dir, sample_dir, tmp_path):
    """Redeploying an app with another model while a client keeps sending requests: none may fail (Serve's
    Python proxy; the HAProxy path is swapped by tests/test_jobs.py, through the Serve REST API). The `tiny`
    app is swapped: its overload test has run, and a new app would cost another deployment."""

    from ray import serve

    from deepfake.serve import build_app

    url = f"{app_url}/tiny"
    before = wait_healthy(url)["model"]
    model_b = _model_copy(trained_model_dir, tmp_path / "model_b", "2025-02-02T00:00:00+00:00")
    with Traffic(f"{url}/predict", sample_image(sample_dir).read_bytes()) as traffic:
        serve.run(build_app(tiny_args(model_b)), name="tiny", route_prefix="/tiny", blocking=False)
        traffic.wait_for_model("20250202")
    assert before in traffic.models and "20250202" not in before  # it served the old model, then the new
    traffic.assert_swapped_without_failure("20250202")


def test_api_keys_and_rate_limits(app_url, sample_dir):
    url, body = f"{app_url}/locked", sample_image(sample_dir).read_bytes()
    no_key = httpx.post(f"{url}/predict", content=body, timeout=60)
    assert no_key.status_code == 401 and no_key.json()["error"] == "unauthorized"
    assert no_key.headers["WWW-Authenticate"].startswith("Bearer")
    assert (
        httpx.post(f"{url}/predict", content=body, headers={"X-API-Key": "wrong-0123456789abcdef"}).status_code == 401
    )
    assert httpx.get(f"{url}/model", timeout=30).status_code == 401  # the health probe, page and schema are open
    assert httpx.get(f"{url}/openapi.json", timeout=30).status_code == 200
    assert (
        httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        and httpx.get(f"{url}/", timeout=30).status_code == 200
    )
    ok = [
        httpx.post(f"{url}/predict", content=body, headers=h, timeout=60)
        for h in ({"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}, {"X-API-Key": API_KEY})
    ]
    assert [r.status_code for r in ok] == [200, 200, 200]
    assert ok[0].json()["results"][0]["verdict"] in ("ai", "real", "uncertain")
    limited = httpx.post(f"{url}/predict", content=body, headers={"X-API-Key": API_KEY}, timeout=60)
    assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    time.sleep(float(limited.headers["Retry-After"]) + 0.1)
    assert httpx.post(f"{url}/predict", content=body, headers={"X-API-Key": API_KEY}, timeout=60).status_code == 200
    assert httpx.post(f"{app_url}/predict", content=body, timeout=60).status_code == 200  # the open app stays open


def test_request_pixel_budget_and_format_allow_list(app_url):
    # three 6000x6000 1-bit PNGs: each under the per-image limit, 108 Mpx together over the 80 Mpx budget
    big = png_bytes(Image.new("1", (6000, 6000)))
    files = [("file", (f"b{i}.png", big, "image/png")) for i in range(3)]
    r = httpx.post(f"{app_url}/predict", files=files, timeout=60)
    assert r.status_code == 413 and r.json()["error"] == "too_many_pixels" and "108.0 Mpx" in r.json()["detail"]
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, format="ICO")
    r = httpx.post(f"{app_url}/predict", content=ico.getvalue(), timeout=60)
    assert r.status_code == 415 and r.json()["error"] == "unsupported_format" and "ICO" in r.json()["detail"]


def test_models_are_served_by_name_from_one_deployment(app_url, model_zoo, trained_model_dir):
    """Serve's model multiplexing: ?model=NAME or the serve_multiplexed_model_id header picks a folder of the
    models directory (an ensemble folder like any other), the default model when none is named, 404 JSON for
    an unknown name; the ensemble's answer is the mean of its members' calibrated P(ai)."""
    from deepfake.inference import load_scorer, scorer_info

    listing = httpx.get(f"{app_url}/models", timeout=30).json()
    assert listing["default"]["name"] == trained_model_dir.name
    assert set(listing["models"]) >= {"calibrated", "other", "pair"}
    body = jpeg_bytes(seed=3)
    default = httpx.post(f"{app_url}/predict", content=body, timeout=60).json()["results"][0]
    assert default["model"] == scorer_info(trained_model_dir)["version"]
    pair = httpx.post(f"{app_url}/predict?model=pair", content=body, timeout=60).json()["results"][0]
    other = httpx.post(
        f"{app_url}/predict", content=body, headers={"serve_multiplexed_model_id": "other"}, timeout=60
    ).json()["results"][0]
    calibrated = httpx.post(f"{app_url}/predict?model=calibrated", content=body, timeout=60).json()["results"][0]
    assert pair["model"] == scorer_info(model_zoo / "pair")["version"]
    assert other["model"] == scorer_info(model_zoo / "other")["version"]
    assert pair["prob_ai"] == pytest.approx((other["prob_ai"] + calibrated["prob_ai"]) / 2, abs=1e-4)
    local = load_scorer(model_zoo / "pair", device="cpu").predict_images([Image.open(io.BytesIO(body)).convert("RGB")])
    assert pair["prob_ai"] == pytest.approx(local[0]["prob_ai"], abs=1e-4)
    r = httpx.post(f"{app_url}/predict?model=nope", content=body, timeout=30)
    assert r.status_code == 404 and r.json()["error"] == "unknown_model" and "pair" in r.json()["models"]
    r = httpx.post(f"{app_url}/predict?model=../calibrated", content=body, timeout=30)
    assert r.status_code == 404
    r = httpx.post(f"{app_url}/explain?model=pair&format=json", content=body, timeout=120)
    assert r.status_code == 200 and r.json()["results"][0]["model"] == pair["model"]
    meta = httpx.get(f"{app_url}/model?model=pair", timeout=30).json()
    assert meta["name"] == "pair" and "member_dirs" not in meta["meta"] and "trust" in meta["meta"]

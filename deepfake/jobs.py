"""Running the stages on a Ray cluster through the Jobs API (`ray.job_submission.JobSubmissionClient`).

The laptop side (`deepfake jobs submit|status|logs|stop|list`) builds an entrypoint + runtime_env, submits,
follows the logs and turns the job's final status into an exit code. The cluster side is `run_job`: the
`rayjobs/<job>.py` entrypoints (and `python -m deepfake.jobs <job>` for an installed package) call it, and it
runs the same `deepfake` CLI command there, or deploys a Serve config file.

The pure parts (address, entrypoint, runtime_env, exit codes, serve config edits) need no cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from deepfake.config import REPO_ROOT, ConfigError

log = logging.getLogger(__name__)

JOBS = ("train", "tune", "evaluate", "predict", "serve", "reproduce")
MODULES = {job: f"rayjobs.{'serve_deploy' if job == 'serve' else job}" for job in JOBS}

# Never upload these with the working copy: the virtualenv, runs, search output, data archives, caches.
# Ray also honours .gitignore / .rayignore inside the working dir: ours keeps trained models out but lets the
# shipped one (models/cifake-b0, ~16 MB) travel, so the default model path works on the cluster too.
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    ".helper",
    "runs",
    "tune_out",
    "test-artifacts",
    "build",
    "*.egg-info",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "bench/results",
    "*.tar",
    "*.tar.gz",
    "*.tgz",
    "*.zip",
    "*.pth",
    "*.pt",
]

EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
TAIL_LINES = 40


class JobsError(ConfigError):
    """A job request that cannot be made (no address, bad K=V, not a checkout); the CLI exits 2."""


# ---------------------------------------------------------------------------------------------- pure helpers
def resolve_address(address: str | None) -> str:
    """--address, else RAY_ADDRESS: the head's dashboard, e.g. http://127.0.0.1:8265 (via `ray dashboard`)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobsError(
            "no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
            "(after `ray up cluster.yaml`, run `ray dashboard cluster.yaml` and use http://127.0.0.1:8265)"
        )
    return address


def repo_root() -> Path:
    """The source checkout this package was imported from (it holds rayjobs/), uploaded as the working dir."""
    return REPO_ROOT


def build_entrypoint(job: str, args: list[str], installed: bool = False) -> str:
    """The shell command the cluster runs: the rayjobs module from the uploaded working copy, or the installed
    package's own dispatcher when the cluster has `deepfake` pip-installed (cluster.yaml's setup_commands)."""
    if job not in JOBS:
        raise JobsError(f"unknown job {job!r}: expected one of {', '.join(JOBS)}")
    module = "deepfake.jobs " + job if installed else MODULES[job]
    return f"python -m {module} {shlex.join(args)}".rstrip()


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise JobsError(f"--env {item!r}: expected KEY=VALUE")
        env[key.strip()] = value
    return env


def build_runtime_env(
    working_dir: str | None = None,
    installed: bool = False,
    pip: list[str] | None = None,
    env: dict[str, str] | None = None,
    excludes: list[str] | None = None,
) -> dict[str, Any]:
    """runtime_env for the job: the working copy (uploaded, big files excluded) unless `installed`, plus pip
    packages and environment variables. Everything the job starts (Train workers, Tune trials) inherits it."""
    runtime_env: dict[str, Any] = {}
    if not installed:
        wd = Path(working_dir) if working_dir else repo_root()
        if not (wd / "rayjobs").is_dir() or not (wd / "deepfake").is_dir():
            raise JobsError(
                f"{wd} is not a deepfake source checkout (no rayjobs/ and deepfake/): pass --working-dir "
                "CHECKOUT, or --installed when the cluster has the package installed"
            )
        runtime_env["working_dir"] = str(wd.resolve())
        runtime_env["excludes"] = list(EXCLUDES if excludes is None else excludes)
    if pip:
        runtime_env["pip"] = list(pip)
    if env:
        runtime_env["env_vars"] = dict(env)
    return runtime_env


def exit_code(status: Any) -> int:
    """SUCCEEDED -> 0, FAILED/STOPPED -> 1 (a job that never finished is also a failure)."""
    return EXIT_CODES.get(str(status), 1)


def log_tail(logs: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(logs.rstrip("\n").splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------- client side
def client(address: str | None):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    addr = resolve_address(address)
    try:
        return JobSubmissionClient(addr)
    except AuthenticationError as e:
        raise JobsError(
            f"the cluster at {addr} wants its auth token: export RAY_AUTH_MODE=token (token in ~/.ray/auth_token "
            f"or RAY_AUTH_TOKEN_PATH): {e}"
        ) from None
    except (ConnectionError, RuntimeError) as e:
        raise JobsError(f"cannot reach the Ray Jobs API at {addr}: {e}") from None


def submit(
    job: str,
    args: list[str],
    address: str | None = None,
    working_dir: str | None = None,
    installed: bool = False,
    pip: list[str] | None = None,
    env: dict[str, str] | None = None,
    submission_id: str | None = None,
    entrypoint_num_gpus: float | None = None,
) -> tuple[Any, str]:
    """Submit one job; returns (client, submission id)."""
    entrypoint = build_entrypoint(job, args, installed)
    runtime_env = build_runtime_env(working_dir, installed, pip, env)
    c = client(address)
    job_id = c.submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        submission_id=submission_id,
        metadata={"deepfake_job": job},
        entrypoint_num_gpus=entrypoint_num_gpus,
    )
    log.info("submitted %s job %s: %s", job, job_id, entrypoint)
    return c, job_id


def follow_logs(c, job_id: str, out: TextIO | None = None) -> None:
    """Stream the job's logs as they come (websocket); fall back to polling if the stream breaks."""
    out = out or sys.stdout

    async def _tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
        return
    except Exception as e:  # the stream is a convenience: polling gives the same logs
        log.debug("log stream for %s ended (%s); polling", job_id, e)
    seen = 0
    while True:
        status = c.get_job_status(job_id)
        logs = c.get_job_logs(job_id)
        out.write(logs[seen:])
        out.flush()
        seen = len(logs)
        if status.is_terminal():
            return
        time.sleep(1.0)


def wait(c, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0):
    """Poll until the job reaches a terminal status (logs may end a moment before the status flips)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = c.get_job_status(job_id)
        if status.is_terminal():
            return status
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def report_failure(c, job_id: str, err: TextIO | None = None) -> str:
    """The job's message and its last log lines, for the caller of a failed job."""
    err = err or sys.stderr
    info = c.get_job_info(job_id)
    tail = log_tail(c.get_job_logs(job_id) or "")
    text = f"job {job_id} {info.status}: {info.message or ''}\n--- last {TAIL_LINES} log lines ---\n{tail}\n"
    err.write(text)
    err.flush()
    return text


def job_summary(c, job_id: str) -> dict[str, Any]:
    info = c.get_job_info(job_id)
    return {
        "job_id": job_id,
        "status": str(info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "metadata": info.metadata,
    }


# ---------------------------------------------------------------------------------------------- serve deploy
MODEL_ARG_NAMES = ("model_dir", "model", "model_path")
INHERITED_ENV_KEYS = ("working_dir", "py_modules", "pip", "uv", "conda", "env_vars")


def serve_deploy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rayjobs.serve_deploy", description="deploy a Serve config file to the cluster this job runs on"
    )
    p.add_argument("--config", default="serve_config.yaml", help="Serve config (serve build / serve deploy format)")
    p.add_argument("--model", help="model folder for every application (as seen from the cluster's nodes)")
    p.add_argument("--model-arg", help="application argument that holds the model path (default: found in the file)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="application argument (YAML value)")
    p.add_argument("--http-host", help="HTTP proxy host (0.0.0.0 to listen on every interface)")
    p.add_argument("--http-port", type=int, help="HTTP proxy port")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the apps to be RUNNING")
    p.add_argument("--no-wait", action="store_true", help="return once the config is submitted")
    return p


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

    cfg = copy.deepcopy(config)
    apps = cfg.get("applications") or []
    if not apps:
        raise JobsError("the Serve config has no applications")
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
        if inherited:
            env = dict(inherited)
            env.update(app.get("runtime_env") or {})
            if "env_vars" in inherited and "env_vars" in (app.get("runtime_env") or {}):
                env["env_vars"] = {**inherited["env_vars"], **app["runtime_env"]["env_vars"]}
            app["runtime_env"] = env
    return cfg


def deploy_serve(argv: list[str]) -> int:
    """`serve run CONFIG --non-blocking` from inside a job: start Serve with the file's HTTP options, deploy the
    applications declaratively (their deployment settings apply), wait until they are RUNNING."""
    import yaml

    ns = serve_deploy_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = Path(ns.config)
    if not path.is_file():
        log.error("serve config %s not found (cwd %s)", path, Path.cwd())
        return 2
    try:
        extra_args = {k: yaml.safe_load(v) for k, v in parse_env(ns.arg).items()}  # numbers stay numbers
    except JobsError as e:
        log.error("%s", e)
        return 2
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    if not ray.is_initialized():
        ray.init(namespace="serve", logging_level=logging.WARNING)
    job_env = dict(ray.get_runtime_context().runtime_env or {})
    raw = serve_config_overrides(
        yaml.safe_load(path.read_text()) or {},
        model=ns.model,
        model_arg=ns.model_arg,
        extra_args=extra_args,
        http_host=ns.http_host,
        http_port=ns.http_port,
        runtime_env=job_env,
    )
    config = ServeDeploySchema.model_validate(raw)
    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        controller_options=config.controller_options,
    )
    client.deploy_apps(config, _blocking=False)
    names = [app.name for app in config.applications]
    log.info("submitted Serve applications %s (http %s:%s)", names, config.http_options.host, config.http_options.port)
    if ns.no_wait:
        return 0
    deadline = time.monotonic() + ns.timeout
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = {n: apps[n].message for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            for n, msg in failed.items():
                log.error("application %s %s: %s", n, states[n], msg)
            return 1
        if all(s == "RUNNING" for s in states.values()):
            log.info("Serve applications RUNNING: %s", names)
            return 0
        if time.monotonic() > deadline:
            log.error("timed out after %.0fs waiting for %s", ns.timeout, states)
            return 1
        time.sleep(1.0)


# ---------------------------------------------------------------------------------------------- cluster side
# The shipped detector's recipe, stage by stage (models/cifake-b0's card records both).
# The recipes that retrain the shipped model, stage by stage (each from the previous stage's weights):
# "gpu" is the one the shipped models/cifake-b0 was trained with (one GPU, minutes); "cpu" is the 2-core
# recipe of the earlier model (about 2 hours, 94.4% validation accuracy), for machines without a GPU.
RECIPES = {"gpu": ("cifake-b0-gpu.yaml",), "cpu": ("cifake-b0.yaml", "cifake-b0-finetune.yaml")}
SHIPPED_RECIPE = "gpu"
SHIPPED_LIMITATIONS = (
    "Trained and measured only on CIFAKE: 32x32 images, real ones from CIFAR-10 and AI-generated ones from one "
    "generator (Stable Diffusion 1.4) made to look like CIFAR-10. The validation figures are for that "
    "distribution. They are not evidence about high-resolution photographs, other generators (newer diffusion "
    "models, GANs, editing tools), heavy re-compression or resizing beyond the robustness table, or images that "
    "are partly generated. Inputs of any size are first resized to the model's small input (see Model above; "
    "the training images were 32x32), which throws away most of a large image. Use the verdict as a screening "
    "signal for CIFAR-like images, not as proof."
)


def reproduce(argv: list[str]) -> int:
    """Retrain the shipped model from the data: every stage of its recipe (each from the previous one's
    weights), then the validation evaluation with the robustness sweep and the limitations into its card.
    ARGS: --data PATH --out DIR [--recipe gpu|cpu] [train options for every stage, e.g. --use-gpu true]."""
    from deepfake.cli import main

    p = argparse.ArgumentParser(prog="reproduce", description=reproduce.__doc__)
    p.add_argument("--data", required=True, help="the CIFAKE train split (.tar.gz or folder)")
    p.add_argument("--out", required=True, help="the final model folder; stage k goes to OUT-stageK")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=SHIPPED_RECIPE, help="gpu: the shipped model's")
    ns, rest = p.parse_known_args(argv)
    stages = RECIPES[ns.recipe]
    configs = Path(__file__).parent / "configs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    previous = None
    for i, name in enumerate(stages, 1):
        out = ns.out if i == len(stages) else f"{ns.out}-stage{i}"
        args = ["train", "--config", str(configs / name), "--data", ns.data, "--out", out]
        args += ["--name", f"repro-{stamp}-stage{i}", *(["--pretrained", previous] if previous else []), *rest]
        log.info("stage %d of %d: deepfake %s", i, len(stages), shlex.join(args))
        if rc := main(args):
            return rc
        previous = out
    if rc := main(
        ["evaluate", "--model", ns.out, "--split", "val", "--robustness", "--update-card", "-o", f"{ns.out}/eval"]
    ):
        return rc
    return main(["card", ns.out, "--limitations", SHIPPED_LIMITATIONS])


def run_job(job: str, argv: list[str]) -> int:
    """What a job's entrypoint runs on the cluster: the same `deepfake` command, or a Serve deployment."""
    if job == "serve":
        return deploy_serve(argv)
    if job == "reproduce":
        return reproduce(argv)
    if job not in JOBS:
        print(f"unknown job {job!r}: expected one of {', '.join(JOBS)}", file=sys.stderr)
        return 2
    from deepfake.cli import main

    return main([job, *argv])


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepfake.jobs", description="run one deepfake job (cluster side)")
    p.add_argument("job", choices=JOBS)
    p.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    return run_job(ns.job, ns.args)


if __name__ == "__main__":
    sys.exit(_main())

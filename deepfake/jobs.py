"""The laptop side of running the stages on a Ray cluster through the Jobs API
(`ray.job_submission.JobSubmissionClient`): `deepfake jobs submit|status|logs|stop|list` build an entrypoint +
runtime_env, submit, follow the logs and turn the job's final status into an exit code.

What runs on the cluster is `deepfake.stages` (the `rayjobs/<job>.py` entrypoints, or `python -m
deepfake.stages JOB` for an installed package); this module never imports it. The pure parts (address,
entrypoint, runtime_env, exit codes) need no cluster.
"""

from __future__ import annotations

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
# shipped ones (models/cifake-*, ~90 MB) travel, so the default model path works on the cluster too.
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
    module = "deepfake.stages " + job if installed else MODULES[job]
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

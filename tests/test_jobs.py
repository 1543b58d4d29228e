"""Ray Jobs: the pure pieces, then real jobs on a real `ray start --head` (its own ports, temp dir and process
group, so other Ray instances on this machine are never touched): `deepfake jobs submit`, plain
`ray job submit`, a failing job, and a Serve deployment queried over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from deepfake import checkpoint as ck
from deepfake import jobs, stages
from deepfake.cli import main
from tests.conftest import free_ports
from tests.test_serve_process import _kill_stale_haproxy

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------- pure pieces
def test_address_is_required(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(jobs.JobsError, match="no cluster address"):
        jobs.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert jobs.resolve_address(None) == "http://head:8265"
    assert jobs.resolve_address("http://other:8265") == "http://other:8265"


def test_cli_without_address_exits_2_with_the_reason(monkeypatch, caplog):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["jobs", "submit", "train", "--", "--epochs", "1"]) == 2
    assert "no cluster address" in caplog.text


def test_entrypoints_and_runtime_env():
    e = jobs.build_entrypoint("train", ["--data", "/data/my images", "--epochs", "1"])
    assert e == "python -m rayjobs.train --data '/data/my images' --epochs 1"
    assert jobs.build_entrypoint("serve", []) == "python -m rayjobs.serve_deploy"
    assert jobs.build_entrypoint("tune", ["-v"], installed=True) == "python -m deepfake.stages tune -v"
    with pytest.raises(jobs.JobsError):
        jobs.build_entrypoint("bogus", [])
    for job in jobs.JOBS:  # every job has its entrypoint file
        assert (REPO / (jobs.MODULES[job].replace(".", "/") + ".py")).is_file()

    env = jobs.build_runtime_env(pip=["requests"], env=jobs.parse_env(["A=1", "B=x=y"]))
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"] and "runs" in env["excludes"]
    assert env["pip"] == ["requests"] and env["env_vars"] == {"A": "1", "B": "x=y"}
    assert jobs.build_runtime_env(installed=True) == {}
    with pytest.raises(jobs.JobsError, match="not a deepfake source checkout"):
        jobs.build_runtime_env(working_dir=str(REPO / "tests"))
    with pytest.raises(jobs.JobsError, match="KEY=VALUE"):
        jobs.parse_env(["novalue"])


def test_exit_codes_and_log_tail():
    assert [jobs.exit_code(s) for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING")] == [0, 1, 1, 1]
    logs = "".join(f"line {i}\n" for i in range(100))
    assert jobs.log_tail(logs, 3) == "line 97\nline 98\nline 99"


def test_job_entrypoints_parse_with_the_stage_parser_and_call_the_stage_function(monkeypatch, capsys):
    """`python -m rayjobs.train ARGS` runs `deepfake.train.fit` with the config the same flags give the command,
    without the command line's parser; a bad flag fails before any work."""
    from deepfake import cli

    calls = []

    def fake_fit(cfg, address=None, overwrite=False):
        calls.append((cfg, address, overwrite))
        return {"run": "r", "model_dir": "m", "metrics": {"epoch": 1, "val_acc": 0.5}}

    monkeypatch.setattr("deepfake.train.fit", fake_fit)
    argv = ["--data", "/d", "--epochs", "3", "--set", "train.lr=0.125", "--overwrite", "--address", "auto"]
    assert stages.run_job("train", argv) == 0
    ((cfg, address, overwrite),) = calls
    assert (cfg.data.path, cfg.train.epochs, cfg.train.lr, address, overwrite) == ("/d", 3, 0.125, "auto", True)
    assert json.loads(capsys.readouterr().out)["model_dir"] == "m"
    # `deepfake train` reads the same options (one definition), and gives fit the same config
    assert cli.main(["train", *argv]) == 0 and calls[1][0] == cfg
    for job in ("train", "tune", "evaluate", "predict"):
        options = {o for a in stages.stage_parser(job)._actions for o in a.option_strings}
        sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[job]
        assert options == {o for a in sub._actions for o in a.option_strings}, job
    with pytest.raises(SystemExit) as e:
        stages.run_job("train", ["--epochz", "3"])
    assert e.value.code == 2 and len(calls) == 2
    assert stages.run_job("train", ["--set", "nokey"]) == 2  # a user's error: exit 2 with the reason, no traceback
    assert stages.run_job("bogus", []) == 2


def test_serve_config_overrides():
    from deepfake.config import ConfigError
    from deepfake.serve import serve_config_overrides

    cfg = {
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {"name": "a", "import_path": "deepfake.serve:app", "args": {"model_dir": "models/x"}},
            {"name": "b", "import_path": "x:y", "runtime_env": {"env_vars": {"B": "2"}}},
        ],
    }
    job_env = {"working_dir": "gcs://_ray_pkg_1.zip", "env_vars": {"A": "1"}, "excludes": [".venv"]}
    out = serve_config_overrides(
        cfg, model="/m", extra_args={"k": "v"}, http_host="0.0.0.0", http_port=18000, runtime_env=job_env
    )
    assert out["http_options"] == {"host": "0.0.0.0", "port": 18000}
    assert out["applications"][0]["args"] == {"model_dir": "/m", "k": "v"}
    assert out["applications"][1]["args"]["model"] == "/m"  # ServeArgs' name when the file names none
    assert out["applications"][0]["runtime_env"] == {"working_dir": "gcs://_ray_pkg_1.zip", "env_vars": {"A": "1"}}
    assert out["applications"][1]["runtime_env"]["env_vars"] == {"A": "1", "B": "2"}
    assert cfg["applications"][0]["args"] == {"model_dir": "models/x"}  # the input is not modified
    assert serve_config_overrides(cfg, model="/m", model_arg="path")["applications"][0]["args"]["path"] == "/m"
    with pytest.raises(ConfigError):
        serve_config_overrides({"applications": []})
    # explain=false builds no Explainer: its options go too (Serve refuses options for a missing deployment)
    deps = [{"name": "Ingress"}, {"name": "Explainer", "max_ongoing_requests": 8}]
    cfg["applications"][0]["deployments"] = deps
    lean = serve_config_overrides(cfg, extra_args={"explain": False})["applications"][0]
    assert [d["name"] for d in lean["deployments"]] == ["Ingress"] and len(deps) == 2
    assert len(serve_config_overrides(cfg)["applications"][0]["deployments"]) == 2


# ---------------------------------------------------------------------------------------------- a real head
def _pids_using(marker: str) -> list[int]:
    """Processes of this head only: every Ray process of the session names its temp dir on its command line."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
    return out


HEAD: dict[str, str] = {}


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` in its own process group, on free ports and a private temp dir, started the
    way cluster.yaml starts one: with Serve's fast HTTP path (HAProxy), on side ports of its own."""
    from ray.job_submission import JobSubmissionClient

    from deepfake.serve import FAST_HTTP_ENV, loopback_haproxy

    gcs, dash, client_port, nm, om, agent, agent_grpc, renv, metrics, stats, hmetrics = free_ports(11)
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    HEAD["metrics"] = f"http://127.0.0.1:{metrics}/metrics"  # Ray's Prometheus endpoint on this head
    env = {
        **os.environ,
        **FAST_HTTP_ENV,
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(loopback_haproxy()),  # as cluster.yaml starts a node
        # Ray's default on a cluster node; an embedded Ray started earlier in this process (the session's
        # ray_local) switched it off in os.environ, and the head would inherit that
        "RAY_enable_metrics_collection": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(hmetrics),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is this venv's
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={client_port}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={renv}",
        f"--metrics-export-port={metrics}",
        "--num-cpus=2",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    log_path = Path(temp) / "ray-start.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}: {log_path.read_text()[-3000:]}")
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"the Jobs API at {address} did not come up: {log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=3)  # what is left after that is killed below
        for pid in [proc.pid, *_pids_using(temp)]:  # anything of this session left outside the group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        _kill_stale_haproxy(str(stats))  # Ray 2.60 leaves its HAProxy running after a SIGTERM
        shutil.rmtree(temp, ignore_errors=True)


def _train_args(data: Path, storage: str, out: Path, name: str) -> list[str]:
    return [
        "--data",
        str(data),
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--workers",
        "1",
        "--batch-size",
        "16",
        "--patience",
        "0",
        "--storage-path",
        storage,
        "--name",
        name,
        "--out",
        str(out),
        "--set",
        "train.cpus_per_worker=1",  # two jobs share the 2 CPUs
    ]


def _model_dir_from(logs: str) -> str:
    found = re.findall(r'"model_dir": "([^"]+)"', logs)
    assert found, f"no model_dir in the job output:\n{logs[-3000:]}"
    return found[-1]


def _assert_trained(model_dir: Path, run_dir: Path) -> None:
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in model_dir.iterdir()}
    meta = ck.read_metadata(model_dir)
    assert meta["epochs_run"] == 1 and meta["image_size"] == 32 and meta["config"]["train"]["workers"] == 1
    assert "val_acc" in meta["metrics"]
    assert any(p.is_dir() for p in run_dir.glob("checkpoint_*")), list(run_dir.iterdir())


@pytest.mark.slow
def test_train_jobs_through_deepfake_and_plain_ray_job_submit(ray_head, small_sample, tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # 1. plain `ray job submit` (no wait), the README's equivalent; local storage path
    # (in the job's own process: the other job runs Ray Train; a second Train run would only cost time here)
    plain_args = [
        *_train_args(small_sample, str(tmp_path / "runs"), tmp_path / "plain_model", "plain"),
        "--backend",
        "torch",
    ]
    excludes = json.dumps({"excludes": jobs.EXCLUDES})
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--no-wait", "--working-dir", str(REPO)]
        + ["--runtime-env-json", excludes, "--", "python", "-m", "rayjobs.train", *plain_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    plain_id = re.search(r"raysubmit_\w+", r.stdout + r.stderr).group(0)

    # 2. `deepfake jobs submit train`, following the logs; the run storage is a URI (file://)
    uri = f"file://{tmp_path / 'uri_runs'}"
    rc = main(
        ["jobs", "submit", "train", "--address", ray_head, "--"]
        + _train_args(small_sample, uri, tmp_path / "model", "viajobs")
    )
    out = capsys.readouterr().out
    assert rc == 0, out[-4000:]
    assert json.loads(out.strip().splitlines()[-1])["status"] == "SUCCEEDED"
    assert Path(_model_dir_from(out)) == tmp_path / "model"
    _assert_trained(tmp_path / "model", tmp_path / "uri_runs" / "viajobs")
    # the run's config and split are written next to Ray's checkpoints on URI storage too
    assert yaml.safe_load((tmp_path / "uri_runs" / "viajobs" / "config.yaml").read_text())["train"]["epochs"] == 1
    assert "ref" in (tmp_path / "uri_runs" / "viajobs" / "split.csv").read_text().splitlines()[0].split(",")

    client = JobSubmissionClient(ray_head)
    status = jobs.wait(client, plain_id, timeout_s=240)
    assert str(status) == "SUCCEEDED", client.get_job_logs(plain_id)[-4000:]
    assert Path(_model_dir_from(client.get_job_logs(plain_id))) == tmp_path / "plain_model"
    _assert_trained(tmp_path / "plain_model", tmp_path / "runs" / "plain")

    # status / logs / list subcommands on the finished job
    assert main(["jobs", "status", plain_id, "--address", ray_head]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "SUCCEEDED"
    assert main(["jobs", "logs", plain_id, "--address", ray_head]) == 0
    assert '"model_dir"' in capsys.readouterr().out


@pytest.mark.slow
def test_failing_job_returns_non_zero_with_its_log_tail(ray_head, tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    rc = main(["jobs", "submit", "train", "--address", ray_head, "--", "--data", str(missing), "--epochs", "1"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "FAILED" in captured.err and "last 40 log lines" in captured.err
    assert str(missing) in captured.err  # the job's own error message reached the caller
    assert json.loads(captured.out.strip().splitlines()[-1])["status"] == "FAILED"


@pytest.mark.slow
def test_stop_a_running_job(ray_head, capsys):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    job_id = client.submit_job(entrypoint="sleep 120")
    assert main(["jobs", "stop", job_id, "--address", ray_head]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "STOPPED"


@pytest.mark.slow
def test_serve_deploy_jobs_then_a_rolling_model_swap_over_http(
    ray_head, trained_model_dir, sample_dir, tmp_path, capsys
):
    """serve_config.yaml deployed by a job through the dashboard's Serve REST API (`serve deploy`'s path); the
    app outlives the job and answers through HAProxy on a free port. A second job with another model swaps it
    while a client keeps sending requests: none may fail."""
    import httpx

    from deepfake.images import decode_image
    from deepfake.inference import Predictor
    from tests.test_serve import Traffic, _model_copy

    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    # no Explainer: nothing here explains, and its replicas (twice: the swap) would only cost start-up time
    small = ["device=cpu", "detector_num_cpus=0.5", "explain=false"]
    model_a = _model_copy(trained_model_dir, tmp_path / "model_a", "2024-01-01T00:00:00+00:00")
    model_b = _model_copy(trained_model_dir, tmp_path / "model_b", "2025-02-02T00:00:00+00:00")

    def deploy(model: Path, *flags: str) -> None:
        rc = main(
            ["jobs", "submit", "serve", "--address", ray_head, "--", "--config", "serve_config.yaml"]
            + ["--model", str(model), "--http-port", str(port), "--timeout", "240", *flags]
            + [x for a in small for x in ("--arg", a)]
        )
        out = capsys.readouterr()
        assert rc == 0, out.out[-4000:] + out.err[-4000:]
        assert json.loads(out.out.strip().splitlines()[-1])["status"] == "SUCCEEDED"

    deploy(model_a)
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/healthz", timeout=10).status_code != 200:  # the proxy may 404 for a moment
        assert time.monotonic() < deadline, "the deployed app never became healthy"
        time.sleep(0.5)
    image = sorted((sample_dir / "FAKE").iterdir())[0]
    r = httpx.post(f"{url}/predict?filename={image.name}", content=image.read_bytes(), timeout=60)
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    local = Predictor.from_dir(model_a, device="cpu").predict_images([decode_image(image.read_bytes())])[0]
    assert res["label"] == local["label"] and res["model"] == local["model"] and "20240101" in res["model"]
    assert res["prob_ai"] == pytest.approx(local["prob_ai"], abs=1e-4)

    with Traffic(f"{url}/predict", image.read_bytes()) as traffic:
        deploy(model_b, "--no-wait")  # the old replicas drain for up to a minute; the swap is what counts
        traffic.wait_for_model("20250202")
    traffic.assert_swapped_without_failure("20250202")

    # the app's own Prometheus metrics (ray.serve.metrics), exported by Ray on the node's metrics port
    assert httpx.post(f"{url}/predict", content=b"not an image", timeout=30).status_code == 415
    wanted = ('route="/predict"', 'status="200"', "deepfake_verdicts", "deepfake_decode_rejections")
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):  # the node's exporter may still be starting
            text = httpx.get(HEAD["metrics"], timeout=10).text
        if all(w in text for w in wanted) and 'reason="not_an_image"' in text:
            break
        time.sleep(2)
    lines = [x for x in text.splitlines() if x.startswith("ray_deepfake_requests") and 'route="/predict"' in x]
    assert any('status="200"' in x and float(x.rsplit(" ", 1)[1]) >= 10 for x in lines), lines or text[-2000:]
    assert 'reason="not_an_image"' in text and "ray_deepfake_batch_size_bucket" in text
    assert "ray_deepfake_request_latency_ms_bucket" in text


@pytest.mark.slow
def test_reproduce_runs_every_stage_of_a_recipe(ray_local, small_sample, tmp_path):
    out = tmp_path / "m"
    args = ["--data", str(small_sample), "--out", str(out), "--recipe", "cpu", "--epochs", "1", "--batch-size", "16"]
    args += ["--storage-path", str(tmp_path / "runs"), "--set", "train.log_every=0"]
    args += ["--backend", "torch"]  # the stages' chaining is under test here; Ray Train has tests of its own
    assert stages.run_job("reproduce", args) == 0
    stage1, final = ck.read_metadata(tmp_path / "m-stage1"), ck.read_metadata(out)
    # each stage with its own recorded config; the second from the first's weights
    assert stage1["config"]["train"]["lr"] == 0.002 and stage1["config"]["model"]["pretrained"] == "none"
    assert final["config"]["train"]["lr"] == 0.0002 and final["config"]["model"]["pretrained"] == str(
        tmp_path / "m-stage1"
    )
    assert final["parent"]["train_seconds"] == stage1["train_seconds"]
    # evaluated on the validation part with the robustness sweep, and the card says what it is not
    assert final["metrics"]["val_images"] == 6 and set(final["robustness"]) >= {"clean", "jpeg_q75"}
    card = (out / "README.md").read_text()
    assert "total training wall time, all stages" in card and "Stable Diffusion 1.4" in card

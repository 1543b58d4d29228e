"""The Ray boundary (deepfake.cluster): only it starts Ray; no address means a Ray of our own, never a stale or
foreign one; a given address that does not answer fails in seconds and names it."""

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from deepfake import cluster
from deepfake.config import REPO_ROOT
from deepfake.data import SAMPLE_DIR
from tests.conftest import is_loopback


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def _python(code: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """`code` run by a fresh Python from the repository root (no RAY_ADDRESS), which must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_only_the_boundary_calls_ray_init():
    offenders = []
    for path in sorted((REPO_ROOT / "deepfake").rglob("*.py")) + sorted((REPO_ROOT / "rayjobs").rglob("*.py")):
        if path.name == "cluster.py" and path.parent.name == "deepfake":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init":
                if isinstance(node.func.value, ast.Name) and node.func.value.id == "ray":
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not offenders, f"ray.init outside deepfake/cluster.py: {offenders}"


@pytest.mark.parametrize(
    "address, expected",
    [
        ("10.0.0.5:6379", ("10.0.0.5", 6379)),
        ("10.0.0.5", ("10.0.0.5", cluster.GCS_PORT)),
        ("ray://head", ("head", cluster.CLIENT_PORT)),
        ("ray://head:10002", ("head", 10002)),
        ("http://127.0.0.1:8265", ("127.0.0.1", 8265)),
        ("auto", None),
    ],
)
def test_host_port_of_each_address_form(address, expected):
    assert cluster.host_port(address) == expected


def test_requested_address_local_and_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.requested(None) is None and cluster.requested("local") is None and cluster.is_embedded()
    monkeypatch.setenv("RAY_ADDRESS", "10.1.1.1:6379")
    assert cluster.requested(None) == "10.1.1.1:6379" and not cluster.is_embedded()
    assert cluster.requested("ray://x") == "ray://x"
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert cluster.is_embedded()


def test_a_dead_address_fails_within_seconds_naming_it():
    address = f"127.0.0.1:{_dead_port()}"
    start = time.monotonic()
    with pytest.raises(cluster.ClusterError, match=address):
        cluster.probe(address)
    assert time.monotonic() - start < cluster.PROBE_TIMEOUT_S + 1
    with pytest.raises(cluster.ClusterError, match="expected HOST:PORT"):
        cluster.probe("ray://")


def _images(dst: Path, n: int = 3) -> Path:
    dst.mkdir(parents=True)
    for p in sorted((SAMPLE_DIR / "FAKE").iterdir())[:n]:
        shutil.copy(p, dst / p.name)
    return dst


# each command line run by deepfake.cli.main in one fresh interpreter; prints its exit status, whether torch was
# imported by then, and its seconds
CLI_RUNS = (
    "import json, sys, time\n"
    "from deepfake.cli import main\n"
    "for argv in json.loads(sys.argv[1]):\n"
    "    start = time.monotonic()\n"
    "    rc = main(argv)\n"
    "    print(json.dumps([rc, 'torch' in sys.modules, time.monotonic() - start]), flush=True)\n"
)


def test_cli_with_an_unanswering_address_or_a_bad_setting_fails_before_importing_torch(tmp_path):
    """A dead --address (each stage that joins a cluster) or a settings typo fails in a fraction of a second
    with its reason, not after torch's and timm's imports (about 5 s on 2 cores)."""
    address = f"127.0.0.1:{_dead_port()}"
    images = str(_images(tmp_path / "in"))
    runs = [
        ["predict", images, "-o", str(tmp_path / "p.csv"), "--address", address],
        ["train", "--address", address],
        ["tune", "-o", str(tmp_path / "search"), "--address", address],
        ["serve", "--address", address],
        ["train", "--set", "train.no_such_key=1"],
    ]
    out = _python(CLI_RUNS, json.dumps(runs), timeout=120)
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(rc, torch) for rc, torch, _ in results] == [(2, False)] * len(runs), (results, out.stderr[-2000:])
    assert out.stderr.count(f"no Ray cluster answers at {address}") == 4, out.stderr[-2000:]
    assert "unknown key 'train.no_such_key'" in out.stderr
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "search").exists()
    assert max(seconds for _, _, seconds in results) < 5, results  # a refused connection answers at once


def test_every_user_error_class_the_cli_names_exists():
    """stages.USER_ERRORS names its classes as strings (so that a typo costs no imports): a renamed class would
    turn a user's error into an AttributeError traceback."""
    import importlib

    from deepfake.stages import USER_ERRORS

    for module, name in USER_ERRORS.items():
        assert issubclass(getattr(importlib.import_module(module), name), Exception), (module, name)


# `deepfake predict` as the command line runs it, with a spy on the embedded Ray's shutdown at exit: just before
# it, the spy records every process of that Ray and every socket they listen on
PREDICT_WITH_SPY = (
    "import json, os, sys\n"
    "from deepfake import cluster\n"
    "from deepfake.processes import descendants, process_ids\n"
    "from tests.conftest import listeners_of\n"
    "stop = cluster.stop_embedded\n"
    "def spy():\n"
    "    ours = process_ids(descendants(os.getpid()))\n"
    "    print(json.dumps(sorted(listeners_of([os.getpid(), *ours]))))\n"
    "    print(json.dumps(ours), flush=True)\n"
    "    stop()\n"
    "cluster.stop_embedded = spy  # connect() registers it for the exit\n"
    "from deepfake.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.slow
def test_a_local_run_ignores_a_stale_cluster_listens_on_loopback_and_leaves_no_process(tmp_path):
    """A head recorded by an earlier `ray start` that has since died: `deepfake predict` without --address
    still runs, on a Ray of its own (Ray's default address=None would hang inside ray.init). That Ray's servers
    (GCS, raylet, object manager, core workers, agents, dashboard) listen on loopback only, Ray's default on
    Linux being every interface (cluster.loopback_node); and when the command exits, none of its processes
    is left running (Ray's agents otherwise poll for their dead raylet for 30-120 s)."""
    from deepfake.processes import proc_text, still_running

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_dead_port()}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = str(ray_tmp)
        csv = tmp_path / "p.csv"
        args = ["predict", str(_images(tmp_path / "in")), "-o", str(csv)]
        out = subprocess.run(
            [sys.executable, "-c", PREDICT_WITH_SPY, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=REPO_ROOT,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert len(csv.read_text().strip().splitlines()) == 1 + 3
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("[") or line.startswith("{")]
    started = {int(p): t for p, t in json.loads(lines[-1]).items()}
    left = still_running(started)
    assert len(started) >= 4 and not left, [proc_text(p, "cmdline")[:80] for p in left]
    listening = json.loads(lines[-2])
    assert len(listening) >= 6 and all(is_loopback(ip) for ip, _ in listening), listening


def test_loopback_node_restores_rays_cluster_flag_and_environment(monkeypatch):
    """The flag that keeps an embedded Ray on loopback is Ray's own (its macOS/Windows default); it holds only
    while that Ray starts, so a later `ray start` or join from the same process sees the machine's address. Fails
    loudly if a Ray upgrade renames the flag."""
    from ray._private import ray_constants, services

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    monkeypatch.delenv(name, raising=False)
    assert ray_constants.ENABLE_RAY_CLUSTER
    with cluster.loopback_node():
        assert os.environ[name] == "0" and services.resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"
    assert name not in os.environ and ray_constants.ENABLE_RAY_CLUSTER


def test_another_process_joins_an_embedded_ray_by_its_loopback_address(ray_local):
    """An embedded Ray listens on loopback only; joined by its 127.0.0.1 address from another process (a test's
    CLI on the session's Ray), Ray would rewrite that address to the machine's and wait for a GCS that is not
    there. connect() joins it as a loopback node, and the joining process's task runs on it."""
    address = ray_local.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:") and cluster.loopback_only(address)
    code = (
        "import ray, sys\n"
        "from deepfake.cluster import connect\n"
        "assert not connect(sys.argv[1])\n"
        "print(ray.get(ray.remote(lambda: ray.get_runtime_context().get_node_id()).remote()))\n"
    )
    out = _python(code, address, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == ray_local.get_runtime_context().get_node_id()

"""`deepfake serve` as a user runs it: its own process and embedded Ray, Serve's fast HTTP path (HAProxy),
a crash (SIGKILL) and a restart on the same port, Ctrl-C. Apart from tests/test_serve.py so that its Serve
(five apps, idle) is gone before this starts another one on the same two cores."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import is_loopback, listeners_of, tcp_listeners
from tests.test_serve import Traffic, _config_copy, free_port, sample_image, wait_healthy


@pytest.mark.slow
def test_deepfake_serve_takes_the_fast_http_path(trained_model_dir, sample_dir, tmp_path):
    """`deepfake serve` on its embedded Ray: HAProxy answers on the configured port and forwards to the
    Ingress replica's own HTTP server; predict and the web page work through it; one of its two Ingress
    replicas killed under load: no request fails. Killed with SIGKILL, it
    restarts on the same port (the HAProxy it left is stopped); SIGTERM (the same shutdown as Ctrl-C) leaves no
    process behind."""
    from deepfake.processes import descendants, proc_text, process_ids, still_running
    from deepfake.serve import orphaned_haproxies

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **_haproxy_side_port_env()}
    env.pop("RAY_ADDRESS", None)
    cfg = _config_copy(tmp_path / "serve.yaml", trained_model_dir, port, min_replicas=2)
    cmd = [sys.executable, "-m", "deepfake.cli", "serve", "--config", str(cfg), "--http-path", "haproxy"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, timeout=240)
        img = sample_image(sample_dir).read_bytes()
        r = httpx.post(f"{url}/predict", content=img, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["label"] in ("ai", "real")
        assert "<html" in httpx.get(f"{url}/", timeout=30).text.lower()
        bad = httpx.post(f"{url}/predict", content=b"not an image", timeout=30)
        assert bad.status_code == 415 and "error" in bad.json()
        # an HAProxy of this run forwards the traffic (the proxy path would have none)
        ours = [text for _, text in _haproxy_configs() if f":{port}" in text]
        assert ours, _haproxy_configs()
        assert "timeout client 30s" in ours[0] and "timeout server 300s" in ours[0]  # not Ray's 1-hour default
        # a request a dying replica held is replayed elsewhere (up to twice), a photo included (it fits the buffer)
        assert "retry-on conn-failure empty-response" in ours[0] and "retries 2" in ours[0]
        assert "tune.bufsize 524288" in ours[0]
        # HAProxy's stats and Prometheus listeners on loopback only (Ray's template binds every interface);
        # the HTTP port where the config's host says (127.0.0.1 here)
        side = [int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])]
        listening = {p: _listen_addresses(p) for p in [*side, port]}
        assert all(addrs == {"127.0.0.1"} for addrs in listening.values()), listening
        # and nothing else of the app listens beyond loopback: Ray's own servers included (cluster.loopback_node)
        app = listeners_of([proc.pid, *descendants(proc.pid)])
        assert len(app) > 6 and all(is_loopback(ip) for ip, _ in app), app
        # an Ingress replica killed (SIGKILL, as the OOM killer would) while 8 clients keep posting: HAProxy
        # replays what it held on the other replica, and no request fails. A replay needs the whole request in
        # HAProxy's buffer before it is forwarded (wait-for-body, added by the loopback wrapper): without it,
        # 1-4 keep-alive connections per kill were closed without an answer (httpx sends a body apart from
        # its headers).
        assert "http-request wait-for-body" in ours[0]
        replicas = _wait_for_replicas(proc.pid, "deepfake", "Ingress", 2, timeout=120)
        with Traffic(f"{url}/predict", img, clients=8, pause=0) as traffic:
            time.sleep(2)
            os.kill(replicas[0], signal.SIGKILL)
            time.sleep(3)
        counts = {c: traffic.codes.count(c) for c in set(traffic.codes)}
        assert len(traffic.codes) > 20 and set(traffic.codes) == {200}, (counts, traffic.failures[:3])
        # killed as the OOM killer would: Ray's HAProxy, in a session of its own, outlives it and keeps the port
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        # Ray's own processes notice the dead driver within seconds; an HAProxy left holding the port (seen on
        # some machines: it runs in a session of its own) answers 500 to everything until it is stopped
        time.sleep(5)
        left_behind = orphaned_haproxies([port])
        # started again on the same port: it stops that HAProxy and becomes healthy
        ready_lines = (tmp_path / "serve.log").read_text(errors="replace").count("(Ctrl-C to stop)")
        # (one Ingress replica this time: the second one's start-up, torch's import and the model's load, would
        # only cost time here)
        one = _config_copy(tmp_path / "serve1.yaml", trained_model_dir, port, min_replicas=1)
        cmd[cmd.index(str(cfg))] = str(one)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(url, timeout=240)
        assert httpx.post(f"{url}/predict", content=img, timeout=60).status_code == 200
        # the Ingress answers through HAProxy before Serve calls the app ready; a user presses Ctrl-C after
        _wait_for_line(tmp_path / "serve.log", "(Ctrl-C to stop)", count=ready_lines + 1, timeout=120)
        app_processes = process_ids(descendants(proc.pid))
        # SIGTERM (as systemd or Kubernetes stop it) takes Ctrl-C's path: Serve shut down, HAProxy included
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        assert not any(f":{port}" in text for _, text in _haproxy_configs())
        # and no process of the app outlives it (Ray's agents used to linger for 30-120 s)
        left = still_running(app_processes)
        assert len(app_processes) > 5 and not left, [proc_text(p, "cmdline")[:80] for p in left]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_stale_haproxy(env["RAY_SERVE_HAPROXY_STATS_PORT"])
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "HTTP path: HAProxy + direct ingress" in text
    assert ("stopping HAProxy" in text) == bool(left_behind)  # what the restart found, it stopped


def _wait_for_replicas(root: int, app: str, deployment: str, n: int, timeout: float) -> list[int]:
    """Pids of the app's running `deployment` replicas below process `root` (by their process title), once
    there are `n`."""
    from deepfake.processes import descendants

    title = f"ray::ServeReplica:{app}:{deployment}".encode()
    deadline = time.monotonic() + timeout
    while True:
        pids = []
        for pid in descendants(root):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title):
                    pids.append(pid)
        if len(pids) >= n:
            return sorted(pids)
        assert time.monotonic() < deadline, f"{len(pids)} {deployment} replicas after {timeout} s, wanted {n}"
        time.sleep(0.5)


def _wait_for_line(path: Path, text: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while path.read_text(errors="replace").count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} times in {timeout} s"
        time.sleep(0.5)


def _listen_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (0.0.0.0 and :: included)."""
    return {ip for ip, p in tcp_listeners().values() if p == port}


def _haproxy_configs() -> list[tuple[int, str]]:
    """(pid, config text) of every running haproxy process (its -f file), to see which ports they bind."""
    out = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() != "haproxy":
                continue
            args = (comm.parent / "cmdline").read_bytes().split(b"\0")
            texts = [Path(args[i + 1].decode()).read_text() for i, a in enumerate(args[:-1]) if a == b"-f"]
            out += [(int(comm.parent.name), t) for t in texts]
        except (OSError, ValueError):
            continue
    return out


def _haproxy_side_port_env() -> dict[str, str]:
    """Fresh stats/metrics ports for one test's HAProxy (Ray's defaults are fixed: 8404, 9101)."""
    return {"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}


def _kill_stale_haproxy(stats_port: str) -> None:
    for pid, text in _haproxy_configs():
        if f":{stats_port}" in text:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_http_path_falls_back_to_the_proxy_when_haproxys_ports_are_taken(monkeypatch):
    from deepfake.config import ConfigError
    from deepfake.serve import FAST_HTTP_ENV, http_path_env

    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", str(taken.getsockname()[1]))
        assert http_path_env("auto") == {}  # HAProxy could not start: the proxy actor serves instead
        with pytest.raises(ConfigError, match="in use"):
            http_path_env("haproxy")
    fast = http_path_env("auto")
    assert {k: v for k, v in fast.items() if k in FAST_HTTP_ENV} == FAST_HTTP_ENV and http_path_env("proxy") == {}
    assert Path(fast["RAY_SERVE_HAPROXY_BINARY_PATH"]).name == "haproxy-loopback"  # its side listeners: loopback
    with pytest.raises(ConfigError, match="expected one of"):
        http_path_env("nginx")


def test_stop_survivors_stops_what_outlives_the_shutdown_and_nothing_else():
    from deepfake.processes import alive, process_ids, stop_survivors

    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"]
    )
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        gone.wait(timeout=30)
        time.sleep(0.5)  # the interpreters have installed their handlers
        ids = process_ids([stubborn.pid, polite.pid, gone.pid, other.pid])
        ids[other.pid] = "1"  # a pid whose start time differs: another process now, never touched
        assert sorted(stop_survivors(ids, wait_s=1.0)) == sorted([stubborn.pid, polite.pid])
        assert stubborn.wait(timeout=30) == -signal.SIGKILL and polite.wait(timeout=30) == -signal.SIGTERM
        assert alive(other.pid) and other.poll() is None
    finally:
        for p in (stubborn, polite, other):
            p.kill()
            p.wait()


def test_descendants_finds_children_and_grandchildren():
    """What a hard stop of `deepfake serve` kills on its own Ray: every process below it, grandchildren too."""
    from deepfake.processes import descendants

    child = subprocess.Popen([sys.executable, "-c", "import subprocess; subprocess.run(['sleep', '30'])"])
    try:
        deadline = time.monotonic() + 30
        while not (below := descendants(child.pid)) and time.monotonic() < deadline:  # python starting `sleep`
            time.sleep(0.1)
        assert len(below) == 1 and Path(f"/proc/{below[0]}/cmdline").read_bytes().startswith(b"sleep")
        found = descendants(os.getpid())  # this test's process may have others (a session's Ray, a browser)
        assert child.pid in found and below[0] in found and found.index(child.pid) < found.index(below[0])
    finally:
        for pid in descendants(child.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()


def test_loopback_haproxy_moves_only_the_side_listeners(tmp_path, monkeypatch):
    """The HAProxy wrapper Ray runs: `bind :PORT` / `bind *:PORT` (stats, Prometheus) go to loopback, the HTTP
    frontend keeps the host it was given and waits for whole bodies, and the real HAProxy then runs on the
    rewritten file."""
    from deepfake.serve import loopback_haproxy

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    wrapper = loopback_haproxy()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "defaults\n    mode http\n    timeout client 5s\n    timeout server 5s\n    timeout connect 5s\n"
        "frontend prometheus\n    bind :9101\n    http-request return status 200\n"
        "frontend http_frontend\n    bind 0.0.0.0:8000\n    http-request return status 200\n"
        "listen stats\n    bind *:8404\n    stats enable\n"
    )
    out = subprocess.run([str(wrapper), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr  # the real HAProxy checked the rewritten file
    binds = [line.strip() for line in cfg.read_text().splitlines() if line.strip().startswith("bind")]
    assert binds == ["bind 127.0.0.1:9101", "bind 0.0.0.0:8000", "bind 127.0.0.1:8404"]
    # the HTTP frontend waits for a request's whole body (so HAProxy can replay it), once however often it runs
    subprocess.run([str(wrapper), "-c", "-f", str(cfg)], capture_output=True, timeout=60, check=True)
    lines = [line.strip() for line in cfg.read_text().splitlines()]
    assert sum("wait-for-body" in line for line in lines) == 1
    assert lines[lines.index("frontend http_frontend") + 1].startswith("http-request wait-for-body time 10s")
    # written again in a process whose environment already names the wrapper (an embedded Ray started before
    # sets it): it still runs the real HAProxy, not itself
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(wrapper))
    assert str(wrapper) not in loopback_haproxy().read_text()
    out = subprocess.run([str(wrapper), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr

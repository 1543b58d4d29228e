"""The Ray boundary: the one module that starts or joins Ray. Everything else asks it for a connection.

No address (and no RAY_ADDRESS) means a new Ray embedded in this process (`address="local"`), never the
cluster that the last `ray start` on this machine recorded in its temp dir: after that head has died, Ray's
own default (`address=None`) hangs inside `ray.init`, and while it lives a "local" run silently goes to it.
A given address is probed first, so a cluster that does not answer fails in seconds with its name.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

LOCAL = "local"
PROBE_TIMEOUT_S = 5.0
CLIENT_PORT = 10001  # ray:// addresses without a port (Ray Client's default)
DASHBOARD_PORT = 8265  # http:// addresses without a port (the job-submission / dashboard API)
GCS_PORT = 6379


# An embedded Ray is a private one-machine cluster. Usage statistics would only try to reach the internet.
# Metrics collection is off: nothing scrapes an embedded Ray's metrics (`deepfake serve` turns it back on for its
# Prometheus metrics). bench/ray_startup.py: the metrics pipeline costs little at idle; bench/train_throughput.py
# saw Ray Train at 0.79x the plain loop with it and 0.99x without in one run, 0.99x and 0.87x in the next: the
# 2-core VM's drift (+-12% between plain runs) is larger than the effect. The dashboard stays: Ray Train's
# PlacementGroupCleaner asks its State API for the controller's state every second (without it, each of those
# logs "Failed to query Ray Train Controller actor state"), though it costs 220 MB, 11 processes and about 0.03
# of a core during training.
# Ray Train's preemption watcher (an actor polling for spot-node preemption notices) and its metrics callbacks
# have nothing to do on one machine with metrics off. While a Train worker runs its epochs, every other Ray
# process here (Train's controller and helper actors, the dashboard, raylet, GCS, log monitor) together took
# 0.12 of the 2 cores, about 0.01 per idle actor process, and their wake-ups preempt the training threads.
EMBEDDED_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}
EMBEDDED_OPTIONS: dict[str, object] = {}


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """While an embedded Ray starts: its node address is 127.0.0.1, so every one of its servers (GCS, raylet,
    object manager, core workers, agents) listens on loopback only.

    Ray binds its gRPC servers to 127.0.0.1 exactly when the node's address is 127.0.0.1, but on Linux it
    replaces 127.0.0.1 (even `_node_ip_address="127.0.0.1"`) with the machine's address and listens on every
    interface. It keeps loopback where multi-node clusters are off, its macOS/Windows default:
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for the processes it starts, and the same flag, read once at import,
    in this one. Both are restored afterwards, so a later `ray start` or join from this process is untouched;
    tests/test_cluster.py fails if a Ray upgrade moves that flag or the binding rule."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def loopback_serve_replica() -> None:
    """Keep a Serve replica's inter-deployment gRPC server on loopback when its node is (an embedded Ray).

    Ray 2.60 binds that server to "[::]:0", every interface, with no setting (ray-project/ray#64544), right
    after the deployment's constructor returns; each deployment's constructor calls this first. On a node with
    a routable address (a real cluster) it does nothing: replicas on other nodes reach each other there. The
    one private name is looked up here; if a Ray upgrade moves it, the replica warns and keeps Ray's binding,
    and tests/test_serve_process.py fails on the listener it then finds."""
    import ray

    if ray.util.get_node_ip_address() != "127.0.0.1":
        return
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None:
        log.warning("Serve's replica gRPC binding moved in this Ray; its gRPC port listens on every interface")
        return
    if getattr(bind, "loopback", False):
        return

    def loopback(server: object, address: str) -> int:
        return bind(server, address.replace("[::]", "127.0.0.1", 1))

    loopback.loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = loopback


class ClusterError(ConnectionError):
    """A Ray cluster that was asked for and cannot be reached; the message names the address."""


def requested(address: str | None = None) -> str | None:
    """The address a run asked for: the argument, else RAY_ADDRESS, else None (an embedded local Ray)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "", LOCAL) else address


def is_embedded(address: str | None = None) -> bool:
    """Whether connect(address) starts a Ray inside this process rather than joining a cluster."""
    return requested(address) is None


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for a cluster address, or None for "auto" (Ray searches the machine itself)."""
    if address == "auto":
        return None
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    default = {"ray": CLIENT_PORT, "http": DASHBOARD_PORT, "https": 443}.get(parts.scheme, GCS_PORT)
    try:
        port = parts.port or default
    except ValueError as e:
        raise ClusterError(f"Ray address {address!r}: {e}") from None
    if not parts.hostname:
        raise ClusterError(f"Ray address {address!r}: expected HOST:PORT, ray://HOST[:PORT] or http://HOST[:PORT]")
    return parts.hostname, port


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise ClusterError within `timeout_s` when nothing listens at the address (ray.init would wait minutes)."""
    target = host_port(address)
    if target is None:
        return
    start = time.monotonic()
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({target[0]}:{target[1]}: {e.strerror or e}, "
            f"after {time.monotonic() - start:.1f} s); start it, or leave out --address/RAY_ADDRESS to run on "
            "an embedded local Ray"
        ) from None


def loopback_only(address: str) -> bool:
    """Whether `address` is a Ray that listens on loopback only (another process's embedded Ray): a GCS
    address on loopback whose port does not answer on this machine's own address. Ray would rewrite
    127.0.0.1 to that address and never reach it, so connect() joins such a Ray as a loopback node too; a
    `ray start` head answers on both and is joined as Ray does it."""
    import ipaddress

    if "://" in address or (target := host_port(address)) is None:
        return False
    try:
        if not ipaddress.ip_address(socket.gethostbyname(target[0])).is_loopback:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect(("8.8.8.8", 53))  # sends nothing: the route's source address, as Ray finds its own
            own = udp.getsockname()[0]
    except OSError:
        return False  # no route to compare with: Ray's own rule applies
    try:
        with socket.create_connection((own, target[1]), timeout=1.0):
            return False
    except OSError:
        return True


_EMBEDDED: dict[str, bool] = {}  # set once this process has started an embedded Ray (stop_embedded at exit)
_DASHBOARD: dict[str, str] = {}  # the dashboard of the cluster connect() joined or started ('' when it has none)


def dashboard_url() -> str:
    """http://HOST:PORT of the connected cluster's dashboard, where Serve's REST API lives (`serve deploy`'s
    path); a ClusterError when this process did not connect through connect() or the cluster has none."""
    url = _DASHBOARD.get("url")
    if not url:
        raise ClusterError("no Ray dashboard known for this process's cluster (started with --include-dashboard?)")
    return url if "://" in url else f"http://{url}"


def connect(
    address: str | None = None,
    num_cpus: int | None = None,
    env: Mapping[str, str] | None = None,
    namespace: str | None = None,
    options: Mapping[str, object] | None = None,
) -> bool:
    """Join the cluster at `address`/RAY_ADDRESS, or start an embedded local Ray; True if it was embedded.

    A no-op when Ray is already initialised in this process (a test's shared Ray, a job's driver).
    `env` holds settings that Ray's own processes read when they start (e.g. Serve's HTTP path); they only
    reach an embedded Ray, and variables the user already set win.
    Ray starts its workers at nice 15, so on a small machine every normal-priority process (the driver,
    Ray's daemons, an HTTP load generator) preempts the actual work. The embedded Ray is the whole job
    here, so its workers run at normal priority (RAY_worker_niceness overrides). `options`: more ray.init
    arguments for an embedded Ray (EMBEDDED_OPTIONS are the defaults; bench/ray_startup.py measures them)."""
    import ray

    if ray.is_initialized():
        return False
    target = requested(address)
    if target is None:
        os.environ.setdefault("RAY_worker_niceness", "0")
        for key, value in {**EMBEDDED_ENV, **(env or {})}.items():
            os.environ.setdefault(key, value)
    else:
        if env:
            log.info("joining %s: its processes keep the settings of its own `ray start`", target)
        probe(target)
    saved = os.environ.pop("RAY_ADDRESS", None)  # Ray lets RAY_ADDRESS win over the address it is given
    try:
        kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
        if target is None:
            kwargs.update({**EMBEDDED_OPTIONS, **(options or {}), "num_cpus": num_cpus})
        loopback = target is None or loopback_only(target)
        with loopback_node() if loopback else contextlib.nullcontext():
            context = ray.init(address=target or LOCAL, namespace=namespace, **kwargs)
        _DASHBOARD["url"] = getattr(context, "dashboard_url", None) or ""
        if target is None and not _EMBEDDED:
            atexit.register(stop_embedded)  # runs before Ray's own atexit shutdown (registered earlier)
            _EMBEDDED["stop_at_exit"] = True
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    return target is None


def disconnect() -> None:
    """Stop an embedded Ray (or leave a joined cluster) if this process is connected."""
    import ray

    if ray.is_initialized():
        if _EMBEDDED:
            stop_embedded()
        else:
            ray.shutdown()


def stop_embedded() -> None:
    """Ray's shutdown, then any of its processes below this one that still run stopped: its agents poll for
    their dead raylet for 30-120 s, and an actor whose exit hangs after its core worker is gone (a Ray Train
    TrainController was seen so) would stay for good. Also at exit, for the commands that never disconnect."""
    import ray

    from deepfake.processes import descendants, proc_text, process_ids, stop_survivors

    if not ray.is_initialized():
        return
    ours = process_ids([p for p in descendants(os.getpid()) if "ray" in proc_text(p, "cmdline")])
    ray.shutdown()
    stop_survivors(ours, wait_s=1.0)


def cluster_resources() -> dict[str, float]:
    """The connected cluster's total resources (CPU, GPU, memory, ...)."""
    import ray

    return dict(ray.cluster_resources())

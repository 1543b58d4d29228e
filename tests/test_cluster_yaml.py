"""cluster.yaml against the Ray cluster launcher's own defaults + schema (what `ray up` runs before any cloud
call), plus the properties the cluster flow relies on."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _validated(cfg: dict) -> dict:
    full = prepare_config(copy.deepcopy(cfg))  # merges the provider's defaults.yaml, as `ray up` does
    validate_config(full)
    return full


def test_cluster_yaml_passes_the_launcher_schema(raw):
    full = _validated(raw)
    assert full["provider"]["type"] == "aws"
    assert full["head_node_type"] in full["available_node_types"]


def test_schema_check_has_teeth(raw):
    bad = copy.deepcopy(raw)
    bad["setup_comands"] = ["typo"]  # unknown top-level key
    with pytest.raises(jsonschema.ValidationError):
        _validated(bad)
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        _validated(bad)


def test_gpu_worker_group_scales_from_zero_and_head_has_no_gpu(raw):
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != raw["head_node_type"]}
    assert not re.match(r"(g\d|p\d)", head["node_config"]["InstanceType"])  # a CPU head
    (worker,) = workers.values()
    assert re.match(r"(g\d|p\d)", worker["node_config"]["InstanceType"])  # a GPU instance family
    assert worker["min_workers"] == 0 and 1 <= worker["max_workers"] <= raw["max_workers"]


def test_same_ray_version_and_this_package_everywhere(raw):
    version = ray.__version__
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(p.startswith("ray[") and p.endswith(f"=={version}") for p in pins)
    docker = raw["docker"]
    for image in (docker["head_image"], docker["worker_image"]):
        assert image.startswith(f"rayproject/ray:{version}-py311"), image
    assert docker["worker_image"].endswith("-gpu")
    # the working copy is mounted and pip-installed on every node; the local venv is never synced
    mount = next(remote for remote, local in raw["file_mounts"].items() if local == ".")
    assert any(cmd.startswith("pip install") and mount in cmd for cmd in raw["setup_commands"])
    assert ".venv" in raw["rsync_exclude"]
    assert any(version in cmd for cmd in raw["setup_commands"])  # fails fast on a version mismatch


def test_token_auth_on_every_node(raw):
    assert "~/.ray/auth_token" in raw["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in raw[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start
    head_start = next(c for c in raw["head_start_ray_commands"] if "ray start" in c)
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


def test_every_node_starts_ray_with_serves_fast_http_path(raw):
    from deepfake.serve import FAST_HTTP_ENV

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in raw[key] if "ray start" in c)
        exported = start.split("; ray start")[0]
        for name, value in FAST_HTTP_ENV.items():
            if name != "RAY_SERVE_HAPROXY_NBTHREAD":  # a GPU node has the cores for HAProxy's default
                assert f"{name}={shlex.quote(value)}" in exported, (key, name)
        assert "RAY_SERVE_HAPROXY_BINARY_PATH=$(python -c 'from deepfake.serve import loopback_haproxy" in exported

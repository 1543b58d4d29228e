"""The cluster side of `deepfake jobs`: what a job's entrypoint runs there (`rayjobs/<job>.py`, or
`python -m deepfake.stages JOB ARGS` for an installed package): a stage's `deepfake` command, the shipped
model's whole recipe (`reproduce`), or a Serve config deployed to the cluster the job runs on.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from deepfake.jobs import JOBS, JobsError, parse_env

log = logging.getLogger(__name__)


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


def put_serve_config(dashboard: str, config: dict) -> None:
    """PUT a Serve config to the dashboard's Serve REST API, as `serve deploy` does: the applications in it
    are deployed (or updated in place, with rolling replica swaps) and any others are removed."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"{dashboard.rstrip('/')}/api/serve/applications/",
        data=json.dumps(config).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()
    except urllib.error.HTTPError as e:
        raise OSError(f"{e.code} {e.reason}: {e.read().decode(errors='replace')[:2000]}") from None


def deploy_serve(argv: list[str]) -> int:
    """`serve deploy CONFIG` from inside a job: the file (with the job's runtime env, so the cluster imports
    this checkout) goes to the dashboard's Serve REST API, which starts Serve with its HTTP options and deploys
    the applications declaratively; then wait until they are RUNNING. Public interfaces only."""
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
    from ray.serve.schema import ServeDeploySchema

    from deepfake.cluster import ClusterError, connect, dashboard_url
    from deepfake.config import ConfigError
    from deepfake.serve import serve_config_overrides

    connect(namespace="serve")  # a job's driver: joins the cluster in RAY_ADDRESS
    job_env = dict(ray.get_runtime_context().runtime_env or {})
    try:
        raw = serve_config_overrides(
            yaml.safe_load(path.read_text()) or {},
            model=ns.model,
            model_arg=ns.model_arg,
            extra_args=extra_args,
            http_host=ns.http_host,
            http_port=ns.http_port,
            runtime_env=job_env,
        )
    except ConfigError as e:
        log.error("%s: %s", path, e)
        return 2
    config = ServeDeploySchema.model_validate(raw)  # a bad file fails here, with pydantic's reason
    try:
        put_serve_config(dashboard_url(), config.model_dump(mode="json", exclude_unset=True))
    except (ClusterError, OSError) as e:
        log.error("could not deploy through the dashboard's Serve REST API: %s", e)
        return 1
    names = [app.name for app in config.applications]
    log.info("submitted Serve applications %s (http %s:%s)", names, config.http_options.host, config.http_options.port)
    if ns.no_wait:
        return 0
    deadline = time.monotonic() + ns.timeout
    while True:
        try:
            apps = serve.status().applications
        except Exception as e:  # noqa: BLE001 - the controller the REST call starts may not answer yet
            log.debug("Serve status not available yet: %s", e)
            apps = {}
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
RECIPES = {
    "gpu": ("cifake-b0-gpu.yaml",),
    "cpu": ("cifake-b0.yaml", "cifake-b0-finetune.yaml"),
    "robust": ("cifake-b0-robust.yaml",),  # one epoch from models/cifake-b0 with resize/blur/JPEG/crop degradations
    # ImageNet EfficientNet-Lite0 fine-tuned at 96 px, 4 cosine epochs (needs deepfake[lite])
    "lite0": ("cifake-lite0.yaml",),
}
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
        log.error("unknown job %r: expected one of %s", job, ", ".join(JOBS))
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

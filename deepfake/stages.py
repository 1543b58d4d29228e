"""The stages a user runs on a Ray cluster, each as its command-line arguments and one function of them:
train, tune, evaluate, predict, a Serve deployment and the shipped model's whole recipe. `deepfake STAGE`
(deepfake.cli) and a Ray job's entrypoint on the cluster (`rayjobs/STAGE.py`, or `python -m deepfake.stages
STAGE ARGS` for an installed package) both run them: the same parser, the same call into the stage's module
(`train.fit`, `tune.run_search`, `evaluate.evaluate`, `predict.predict`, Serve's REST API).

Settings come from one Config: defaults <- `--config FILE` <- the flags below <- `--set section.key=value`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepfake import config as cfgmod
from deepfake.jobs import JOBS, MODULES, JobsError, parse_env

log = logging.getLogger("deepfake")

# ---------------------------------------------------------------------------------------------- settings flags
# flag -> dotted config key; one table, so no command re-declares defaults of its own
CONFIG_FLAGS: dict[str, tuple[str, type, str]] = {
    "--data": ("data.path", str, "dataset: folder, CSV manifest or .tar.gz (default: the shipped sample)"),
    "--image-size": ("data.image_size", int, "input resolution (224 default; 32-64 for CPU runs)"),
    "--val-ratio": ("data.val_ratio", float, "validation fraction"),
    "--test-ratio": ("data.test_ratio", float, "test fraction"),
    "--max-per-class": ("data.max_per_class", int, "cap images per class"),
    "--arch": ("model.arch", str, "timm architecture"),
    "--pretrained": ("model.pretrained", str, "none | hub | PATH to weights"),
    "--finetune": ("model.finetune", str, "all | last:K"),
    "--stem-stride": ("model.stem_stride", int, "stem convolution stride (1 for 32 px inputs)"),
    "--epochs": ("train.epochs", int, "max epochs"),
    "--batch-size": ("train.batch_size", int, "global batch size"),
    "--optimizer": ("train.optimizer", str, "adamw | adam | sgd | any timm optimizer"),
    "--lr": ("train.lr", float, "learning rate"),
    "--weight-decay": ("train.weight_decay", float, "weight decay"),
    "--scheduler": ("train.scheduler", str, "step | cosine | none"),
    "--patience": ("train.patience", int, "early-stopping patience (0: off)"),
    "--backend": ("train.backend", str, "ray (Ray Train) | torch (this process, one device, no Ray)"),
    "--workers": ("train.workers", int, "Ray Train workers"),
    "--use-gpu": ("train.use_gpu", str, "auto | true | false"),
    "--storage-path": ("train.storage_path", str, "Ray run storage (path or s3:// / gs:// URI)"),
    "--name": ("train.name", str, "run name"),
    "--out": ("train.out", str, "model export folder"),
}


def add_config_flags(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    p.add_argument("--config", help="YAML config (sections data/model/train/tune)")
    for flag, (key, tp, help_) in CONFIG_FLAGS.items():
        if only is None or key.split(".")[0] in only:
            p.add_argument(flag, dest=key, type=tp, default=None, help=help_)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting, e.g. --set train.label_smoothing=0.1",
    )


def config_from_args(args: argparse.Namespace, config_path: str | None = None) -> cfgmod.Config:
    overrides: dict[str, Any] = {}
    for key in (k for k, _, _ in CONFIG_FLAGS.values()):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    for item in args.set:
        if "=" not in item:
            raise cfgmod.ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v
    if getattr(args, "allow_outside", False):
        overrides["data.allow_outside"] = True
    return cfgmod.load(config_path or args.config, overrides)


ALLOW_OUTSIDE_HELP = "let a CSV manifest name files outside its own folder (absolute paths, ..): refused otherwise"


def allow_outside_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-outside", action="store_true", help=ALLOW_OUTSIDE_HELP)


SHIPPED_HELP = "default: the shipped models/cifake-ensemble"
MODEL_HELP = f"model or ensemble folder (repeat: an ad-hoc ensemble; {SHIPPED_HELP})"


def model_dirs(models: list[str] | None) -> list[str]:
    """The --model folders, resolved; none given means the shipped model."""
    from deepfake.checkpoint import resolve_model_dir

    return [str(resolve_model_dir(m)) for m in (models or [None])]


OP_HELP = (
    "threshold on calibrated P(ai) (0..1), or an operating point the model recorded: fpr=0.01, fpr=0.05 or eer "
    "(default 0.5)"
)
ADDRESS_HELP = "Ray cluster address (default: RAY_ADDRESS or an embedded local Ray)"


# ---------------------------------------------------------------------------------------------- train
def check_address(address: str | None) -> None:
    """Probe a given cluster address (--address or RAY_ADDRESS) before a stage's imports: torch and timm take
    about 5 s, and a cluster that does not answer should fail at once (connect() probes again when it joins)."""
    from deepfake import cluster

    if (target := cluster.requested(address)) is not None:
        cluster.probe(target)


def train_arguments(p: argparse.ArgumentParser) -> None:
    allow_outside_flag(p)
    add_config_flags(p)
    p.add_argument("--resume", metavar="NAME", help="continue an interrupted run by name")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing model folder at --out (refused otherwise)"
    )
    p.add_argument("--address", help=ADDRESS_HELP)


def train_config(args: argparse.Namespace) -> cfgmod.Config:
    """The run's settings: a resumed run's own saved config unless --config is given; a new run's --name must
    be new (its checkpoints would be mixed with another run's)."""
    config_path = args.config
    if args.resume:
        storage = getattr(args, "train.storage_path", None) or cfgmod.TrainConfig.model_fields["storage_path"].default
        saved = Path(storage) / args.resume / "config.yaml"
        if config_path is None and saved.is_file():
            config_path = str(saved)
        elif config_path is None and "://" not in storage:
            raise cfgmod.ConfigError(f"--resume {args.resume}: no run found at {saved.parent}")
    cfg = config_from_args(args, config_path)
    if args.resume:
        cfg.train.name = args.resume
    elif cfg.train.name and "://" not in cfg.train.storage_path:
        existing = Path(cfg.train.storage_path) / cfg.train.name
        if existing.exists():
            raise cfgmod.ConfigError(
                f"run {cfg.train.name!r} already exists in {cfg.train.storage_path}: use --resume "
                f"{cfg.train.name} to continue it, or another --name"
            )
    return cfg


def train(args: argparse.Namespace) -> int:
    """Ray Train (or `--backend torch`), then the best epoch exported as a model folder with its card."""
    cfg = train_config(args)  # a bad setting or address fails before the imports below
    check_address(args.address)
    from deepfake.train import fit

    out = fit(cfg, address=args.address, overwrite=args.overwrite)
    m = out["metrics"]
    log.info(
        "best epoch %s: val_acc %.4f val_loss %.4f; model: %s",
        m.get("epoch"),
        m.get("val_acc", 0),
        m.get("val_loss", 0),
        out.get("model_dir"),
    )
    keys = ("run", "model_dir", "metrics", "train_seconds")
    print(json.dumps({k: out[k] for k in keys if k in out}, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------- tune
TUNE_FLAGS: dict[str, tuple[str, type, str]] = {
    "--samples": ("tune.samples", int, "number of trials"),
    "--tune-epochs": ("tune.epochs", int, "per-trial epoch budget (ASHA max_t)"),
    "--grace-period": ("tune.grace_period", int, "ASHA: epochs before a trial can be stopped"),
    "--reduction-factor": ("tune.reduction_factor", int, "ASHA: keep 1/N at each rung"),
    "--trial-scheduler": (
        "tune.scheduler",
        str,
        "asha (Ray's ASHAScheduler, the default) | hyperband | bohb (Ray's HyperBand schedulers) | fifo",
    ),
    "--searcher": ("tune.searcher", str, "optuna (TPE) | random"),
    "--max-concurrent": ("tune.max_concurrent", int, "trials at once"),
    "--workers-per-trial": ("tune.workers_per_trial", int, "Ray Train workers per trial"),
    "--cpus-per-trial-worker": ("tune.cpus_per_trial_worker", float, "CPUs per trial worker"),
    "--gpus-per-trial-worker": ("tune.gpus_per_trial_worker", float, "GPUs (or a fraction) per trial worker"),
    "--metric": ("tune.metric", str, "val_acc | val_loss"),
    "--mode": ("tune.mode", str, "max | min"),
    "--search-name": ("tune.name", str, "experiment name inside OUT (default: search)"),
}


def tune_arguments(p: argparse.ArgumentParser) -> None:
    allow_outside_flag(p)
    add_config_flags(p)
    for flag, (key, tp, help_) in TUNE_FLAGS.items():
        p.add_argument(flag, dest=key, type=tp, default=None, help=help_)
    p.add_argument("-o", "--output", help="search folder: best_config.yaml, trials.csv, plots (default: tune.out)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search in the output folder")
    p.add_argument("--address", help=ADDRESS_HELP)


def tune(args: argparse.Namespace) -> int:
    """Ray Tune over the search space; the best config goes to OUT/best_config.yaml, ready for `train`."""
    for key, _, _ in TUNE_FLAGS.values():
        if getattr(args, key, None) is not None:
            args.set.append(f"{key}={getattr(args, key)}")
    if args.output:
        args.set.append(f"tune.out={args.output}")
    cfg = config_from_args(args)  # a bad setting or address fails before the imports below
    check_address(args.address)
    from deepfake import tune as tunemod

    if args.resume:  # the search continues with the settings it was started with
        cfg = tunemod.load_saved(cfg.tune.out)
    summary = tunemod.run_search(cfg, out=args.output or cfg.tune.out, resume=args.resume, address=args.address)
    print(json.dumps(summary, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------- evaluate
def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    allow_outside_flag(p)
    p.add_argument("--model", action="append", metavar="DIR", help=MODEL_HELP)
    p.add_argument("--data", help="dataset (default: the data the first model was trained on)")
    p.add_argument("--split", choices=("val", "test", "train", "all"), default="val", help="as split in training")
    p.add_argument("--robustness", action="store_true", help="also score JPEG q90/75/50, 0.5x downscale, blur")
    p.add_argument("-o", "--output", default="eval_out", help="folder for metrics.json, predictions.csv, plots")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes decoding images")
    p.add_argument("--operating-point", "--threshold", dest="operating_point", help=OP_HELP)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the ROC-AUC interval")
    p.add_argument("--update-card", action="store_true", help="record the result in the model folder and its card")


def evaluate(args: argparse.Namespace) -> int:
    """Metrics, plots and (--robustness) the degradation sweep of a model or an ensemble on a split."""
    from deepfake.evaluate import evaluate as run_evaluation
    from deepfake.evaluate import update_card

    models = model_dirs(args.model)
    if args.update_card and len(models) > 1:
        raise cfgmod.ConfigError(
            "--update-card records one model folder's evaluation; make an ensemble folder (deepfake make-ensemble)"
        )
    result = run_evaluation(
        models,
        data=args.data,
        split=args.split,
        robustness=args.robustness,
        out_dir=args.output,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.loader_workers,
        threshold=args.operating_point,
        n_bootstrap=args.bootstrap,
        progress=True,
        allow_outside=args.allow_outside,
    )
    if args.update_card:
        update_card(models[0], result)
    print(json.dumps(result, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------- predict
def predict_arguments(p: argparse.ArgumentParser) -> None:
    allow_outside_flag(p)
    p.add_argument("path", help="folder (every image, recursively), .tar/.tar.gz archive, or CSV manifest (path)")
    p.add_argument("--model", action="append", metavar="DIR", help=MODEL_HELP)
    p.add_argument(
        "-o",
        "--output",
        default="predictions.csv",
        help="CSV: filename, class, verdict, prob_ai, prob_ai_raw, in_domain, domain_score, reason, ... (README)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per model call")
    p.add_argument("--concurrency", type=int, help="model replicas (default: one per GPU, or per 2 CPUs)")
    p.add_argument("--gpus-per-replica", type=float, help="GPUs per replica (default 1 when GPUs exist; 0: CPU)")
    p.add_argument(
        "--overwrite", action="store_true", help="start the output afresh (default: resume, skipping rows written)"
    )
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--operating-point", "--threshold", dest="operating_point", help=OP_HELP)
    p.add_argument("--c2pa-trust", metavar="PEM", help="trusted root certificates for C2PA signers")


def predict(args: argparse.Namespace) -> int:
    """Batch prediction with Ray Data: one CSV row per image, resumable."""
    check_address(args.address)
    from deepfake.predict import predict as run_prediction

    summary = run_prediction(
        model_dirs(args.model),
        args.path,
        args.output,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        gpus_per_replica=args.gpus_per_replica,
        overwrite=args.overwrite,
        address=args.address,
        operating_point=args.operating_point,
        c2pa_trust=args.c2pa_trust,
        allow_outside=args.allow_outside,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------- serve deploy
def serve_deploy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="serve_config.yaml", help="Serve config (serve build / serve deploy format)")
    p.add_argument("--model", help="model folder for every application (as seen from the cluster's nodes)")
    p.add_argument("--model-arg", help="application argument that holds the model path (default: found in the file)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="application argument (YAML value)")
    p.add_argument("--http-host", help="HTTP proxy host (0.0.0.0 to listen on every interface)")
    p.add_argument("--http-port", type=int, help="HTTP proxy port")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the apps to be RUNNING")
    p.add_argument("--no-wait", action="store_true", help="return once the config is submitted")


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


def deploy_serve(ns: argparse.Namespace) -> int:
    """`serve deploy CONFIG` from inside a job: the file (with the job's runtime env, so the cluster imports
    this checkout) goes to the dashboard's Serve REST API, which starts Serve with its HTTP options and deploys
    the applications declaratively; then wait until they are RUNNING. Public interfaces only."""
    import yaml

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


# ---------------------------------------------------------------------------------------------- reproduce
# The shipped models' recipes, stage by stage (each model's card records them): a stage is a config file in
# deepfake/configs/ and the settings changed on top of it (section.key -> value, as `--set` takes them).
RECIPES: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "gpu": (("cifake-b0-gpu.yaml", {}),),
    "cpu": (("cifake-b0.yaml", {}), ("cifake-b0-finetune.yaml", {})),
    # one epoch from models/cifake-b0 with resize/blur/JPEG/crop degradations
    "robust": (("cifake-b0-robust.yaml", {}),),
    # ImageNet EfficientNet-Lite0 fine-tuned at 96 px, 4 cosine epochs (needs deepfake[lite])
    "lite0": (("cifake-lite0.yaml", {}),),
    # the default ensemble's third member: the same recipe over a 5-epoch cosine with another training seed
    "lite0-s3": (("cifake-lite0.yaml", {"train.epochs": 5, "train.seed": 3}),),
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


def reproduce_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the CIFAKE train split (.tar.gz or folder)")
    p.add_argument("--out", required=True, help="the final model folder; stage k goes to OUT-stageK")
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=SHIPPED_RECIPE,
        help="gpu: cifake-b0's; the default ensemble's members are gpu, lite0 and lite0-s3",
    )
    p.set_defaults(train_args=[])  # any other option is a train option for every stage, e.g. --use-gpu true


def reproduce(args: argparse.Namespace) -> int:
    """Retrain the shipped model from the data: every stage of its recipe (each from the previous one's
    weights), then the validation evaluation with the robustness sweep and the limitations into its card."""
    from deepfake.checkpoint import record_limitations

    stages = RECIPES[args.recipe]
    configs = Path(__file__).parent / "configs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    previous = None
    for i, (name, settings) in enumerate(stages, 1):
        out = args.out if i == len(stages) else f"{args.out}-stage{i}"
        argv = ["--config", str(configs / name), "--data", args.data, "--out", out, "--name", f"repro-{stamp}-stage{i}"]
        argv += [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
        argv += [*(["--pretrained", previous] if previous else []), *args.train_args]
        log.info("stage %d of %d: train %s", i, len(stages), shlex.join(argv))
        train(stage_parser("train").parse_args(argv))
        previous = out
    evaluate_argv = ["--model", args.out, "--split", "val", "--robustness", "--update-card", "-o", f"{args.out}/eval"]
    evaluate(stage_parser("evaluate").parse_args(evaluate_argv))
    record_limitations(args.out, SHIPPED_LIMITATIONS)
    return 0


# ---------------------------------------------------------------------------------------------- running one
STAGES: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "train": (train_arguments, train, "train with Ray Train and export the best model + card"),
    "tune": (tune_arguments, tune, "hyperparameter search (Ray Tune + ASHA) -> best_config.yaml"),
    "evaluate": (evaluate_arguments, evaluate, "metrics, plots and robustness of a model (or an ensemble)"),
    "predict": (predict_arguments, predict, "batch prediction with Ray Data: folder, .tar(.gz) or CSV -> CSV"),
    "serve": (serve_deploy_arguments, deploy_serve, "deploy a Serve config file to the cluster this job runs on"),
    "reproduce": (reproduce_arguments, reproduce, "retrain the shipped model: every stage of its recipe"),
}
assert set(STAGES) == set(JOBS), "every job has its stage"


def stage_parser(job: str) -> argparse.ArgumentParser:
    """One stage's own parser, as its Ray job entrypoint reads its arguments (`python -m rayjobs.JOB ARGS`)."""
    add_arguments, _, help_ = STAGES[job]
    p = argparse.ArgumentParser(prog=f"python -m {MODULES[job]}", description=help_)
    add_arguments(p)
    return p


# module -> the class of the errors a user's input causes there (bad config, data, model folder, image, address)
USER_ERRORS = {
    "deepfake.config": "ConfigError",
    "deepfake.data": "DataError",
    "deepfake.model": "ModelError",
    "deepfake.checkpoint": "CheckpointError",
    "deepfake.images": "BadImage",
    "deepfake.calibration": "CalibrationError",
    "deepfake.guard": "GuardError",
    "deepfake.provenance": "ProvenanceError",
    "deepfake.cluster": "ClusterError",
}


def user_errors() -> tuple[type[BaseException], ...]:
    """The user-error classes of USER_ERRORS whose modules are loaded, and FileNotFoundError: a clear message and
    exit status 2, never a traceback. An exception's class was imported before it was raised, so the classes of
    modules not loaded yet cannot match; importing them all would cost a config typo torch's and timm's imports
    (about 5 s of a 5 s run)."""
    loaded = ((sys.modules.get(module), name) for module, name in USER_ERRORS.items())
    return (FileNotFoundError, *(getattr(m, name) for m, name in loaded if m is not None))


def run_guarded(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a stage (or any command) and turn the user's errors into exit status 2 with the reason logged, and
    Ctrl-C into 130 (naming the model folder that an interrupted training run exported)."""
    try:
        return int(func(args) or 0)
    except user_errors() as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt as e:
        saved = getattr(e, "result", {}).get("model_dir")  # train.Interrupted: the best epoch was exported
        log.error("interrupted%s", f"; the best epoch so far is in {saved}" if saved else "")
        return 130


def run_job(job: str, argv: list[str]) -> int:
    """What a Ray job's entrypoint runs on the cluster: the stage's parser, then the stage's function."""
    if job not in STAGES:
        log.error("unknown job %r: expected one of %s", job, ", ".join(STAGES))
        return 2
    logging.basicConfig(level=logging.INFO, format=cfgmod.LOG_FORMAT)
    _, func, _ = STAGES[job]
    parser = stage_parser(job)
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "train_args"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # reproduce: the options it passes on to every training stage
        args.train_args = extra
    return run_guarded(func, args)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepfake.stages", description="run one deepfake job (cluster side)")
    p.add_argument("job", choices=JOBS)
    p.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    return run_job(ns.job, ns.args)


if __name__ == "__main__":
    sys.exit(_main())

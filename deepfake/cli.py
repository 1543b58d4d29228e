"""`deepfake` command line: a thin layer over the stage modules. The stages that also run as Ray jobs (train,
tune, evaluate, predict) come with their arguments from `deepfake.stages`; the rest (data, explain, calibrate,
provenance, card, serve, jobs) are here. Settings come from one Config (`stages.config_from_args`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from deepfake import config as cfgmod
from deepfake import stages
from deepfake.stages import OP_HELP, SHIPPED_HELP, add_config_flags, allow_outside_flag, config_from_args, model_dirs

log = logging.getLogger("deepfake")


# ---------------------------------------------------------------------------------------------- commands
def cmd_data_summarize(args: argparse.Namespace) -> int:
    from deepfake.data import report, scan, split_samples

    cfg = config_from_args(args)
    catalog = scan(args.path, allow_outside=args.allow_outside)
    split = split_samples(
        catalog.samples, cfg.data.val_ratio, cfg.data.test_ratio, cfg.data.seed, cfg.data.max_per_class
    )
    rep = report(catalog, split)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
    lines = [f"{rep['source']} ({rep['layout']}): {rep['images']} usable images {rep['per_class']}"]
    for name, counts in rep["splits"].items():
        lines.append(f"  {name:5s} {counts}")
    lines.append(
        f"  duplicates: {rep['duplicate_groups']} groups of byte-identical files "
        f"({rep['duplicate_images']} images), kept within one split; label conflicts: "
        f"{rep['label_conflicts']}"
    )
    lines.append(f"  skipped: {rep['skipped']} {rep['skipped_by_reason']}")
    for row in rep["skipped_files"][: args.show_skipped]:
        lines.append(f"    {row['reason']:20s} {row['ref']}")
    if rep["skipped"] > args.show_skipped:
        lines.append(f"    ... {rep['skipped'] - args.show_skipped} more (use --json for the full list)")
    print("\n".join(lines))
    return 0


def cmd_jobs_submit(args: argparse.Namespace) -> int:
    """Submit a stage as a Ray job, follow its logs, exit with its status (SUCCEEDED 0, FAILED/STOPPED 1)."""
    from deepfake import jobs

    c, job_id = jobs.submit(
        args.job,
        args.args,
        address=args.address,
        working_dir=args.working_dir,
        installed=args.installed,
        pip=args.pip,
        env=jobs.parse_env(args.env),
        submission_id=args.submission_id,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
    )
    print(json.dumps({"job_id": job_id}), flush=True)
    if args.no_wait:
        return 0
    jobs.follow_logs(c, job_id)
    status = jobs.wait(c, job_id)
    if jobs.exit_code(status) != 0:
        jobs.report_failure(c, job_id)
    print(json.dumps({"job_id": job_id, "status": str(status)}))
    return jobs.exit_code(status)


def cmd_jobs_status(args: argparse.Namespace) -> int:
    from deepfake import jobs

    print(json.dumps(jobs.job_summary(jobs.client(args.address), args.job_id), indent=2, default=str))
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from deepfake import jobs

    c = jobs.client(args.address)
    if args.follow:
        jobs.follow_logs(c, args.job_id)
    else:
        sys.stdout.write(c.get_job_logs(args.job_id))
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    from deepfake import jobs

    c = jobs.client(args.address)
    stopped = c.stop_job(args.job_id)
    status = jobs.wait(c, args.job_id, timeout_s=args.timeout) if args.wait else c.get_job_status(args.job_id)
    print(json.dumps({"job_id": args.job_id, "stop_requested": stopped, "status": str(status)}))
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from deepfake import jobs

    rows = [
        {"job_id": j.submission_id or j.job_id, "status": str(j.status), "entrypoint": j.entrypoint}
        for j in jobs.client(args.address).list_jobs()
    ]
    print(json.dumps(rows, indent=2))
    return 0


def cmd_make_ensemble(args: argparse.Namespace) -> int:
    from deepfake.calibrate import make_ensemble

    kw = {"data": args.data, "band": _band(args.band), "allow_outside": args.allow_outside}
    result = make_ensemble(args.out, args.members, overwrite=args.overwrite, calibrate=not args.no_calibrate, **kw)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from deepfake.ensemble import ensemble_files

    print(json.dumps(ensemble_files(args.csv, args.output, method=args.method), indent=2))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from deepfake.data import DataError
    from deepfake.explain import explain_images, write_explanations
    from deepfake.files import FileTooLarge, read_capped
    from deepfake.images import BadImage, decode_image
    from deepfake.inference import load_scorer
    from deepfake.provenance import load_trust, read_provenance

    predictor = load_scorer(
        model_dirs([args.model] if args.model else None)[0], device=args.device, operating_point=args.operating_point
    )
    trust = load_trust(args.c2pa_trust)
    images, names, failed, provenance = [], [], [], []
    for path in args.images:
        try:
            data = read_capped(path)
            images.append(decode_image(data))
            names.append(path)
            provenance.append(read_provenance(data, trust))
        except BadImage as e:
            failed.append({"path": path, "reason": e.reason})
        except FileTooLarge as e:
            failed.append({"path": path, "reason": f"too_large: {e}"})
        except OSError as e:
            failed.append({"path": path, "reason": f"unreadable: {e.strerror or e}"})
    for row in failed:
        log.error("skipped %s: %s", row["path"], row["reason"])
    if not images:
        raise DataError(f"none of the {len(args.images)} images could be read")
    expls = explain_images(predictor, images, target=args.target, batch_size=args.batch_size, progress=True)
    result = write_explanations(expls, names, args.output)
    for row, prov in zip(result["images"], provenance):
        row["provenance"] = prov  # beside the verdict, never merged into it
    print(json.dumps({**result, "failed": failed}, indent=2))
    return 0


def _band(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise cfgmod.ConfigError(f"--band {text!r}: expected LO,HI") from None
    return lo, hi


def cmd_calibrate(args: argparse.Namespace) -> int:
    from deepfake.calibrate import calibrate, calibrate_ensemble, remove
    from deepfake.checkpoint import is_ensemble, resolve_model_dir
    from deepfake.guard import DEFAULT_TAPS

    if args.remove:
        remove(resolve_model_dir(args.model))
        return 0
    band = _band(args.band)
    if is_ensemble(resolve_model_dir(args.model)):
        result = calibrate_ensemble(
            args.model,
            data=args.data,
            band=band,
            batch_size=args.batch_size,
            device=args.device,
            allow_outside=args.allow_outside,
        )
        print(json.dumps(result, indent=2, default=str))
        return 0
    result = calibrate(
        args.model,
        data=args.data,
        fit_images=args.fit_images,
        band=band,
        quantile=1 - args.flag_rate,
        taps=None if args.guard_features == "low" else DEFAULT_TAPS,
        batch_size=args.batch_size,
        device=args.device,
        allow_outside=args.allow_outside,
    )
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_provenance(args: argparse.Namespace) -> int:
    """One JSON line per file: its provenance record (C2PA, generator metadata), without the model."""
    from deepfake.images import IMAGE_SUFFIXES
    from deepfake.provenance import load_trust, read_provenance

    trust = load_trust(args.c2pa_trust)
    rc = 0
    for arg in args.paths:
        p = Path(arg)
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
        for f in files:
            try:
                record = read_provenance(f.read_bytes(), trust, remote=args.c2pa_remote)
            except OSError as e:
                record, rc = {"error": f"unreadable: {e.strerror or e}"}, 2
            print(json.dumps({"path": str(f), **record}, ensure_ascii=False), flush=True)
    return rc


def cmd_card(args: argparse.Namespace) -> int:
    """Regenerate a model card from its metadata, optionally recording the model's limitations first."""
    from deepfake.checkpoint import (
        is_ensemble,
        read_ensemble,
        read_metadata,
        record_limitations,
        resolve_model_dir,
        write_ensemble,
        write_metadata,
    )

    d = resolve_model_dir(args.model)
    if args.limitations:
        text = args.limitations
        record_limitations(d, Path(text[1:]).read_text().strip() if text.startswith("@") else text)
    else:  # the card again from the metadata as it is
        write_ensemble(d, read_ensemble(d)) if is_ensemble(d) else write_metadata(d, read_metadata(d))
    print((d / "README.md").read_text())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    stages.check_address(args.address)
    from deepfake.serve import run_local

    run_local(
        config=args.config,
        model=args.model,
        port=args.port,
        host=args.host,
        address=args.address,
        http_path=args.http_path,
        operating_point=args.operating_point,
        c2pa_trust=args.c2pa_trust,
        api_keys=args.api_keys,
        rate_limit=args.rate_limit,
        models_dir=args.models_dir,
    )
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepfake", description="Tell AI-generated images from real photos.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    summ = data.add_parser("summarize", help="counts per class and split, duplicates, skipped files")
    summ.add_argument("path")
    summ.add_argument("--json", help="also write the full report (every skipped file) as JSON")
    summ.add_argument("--show-skipped", type=int, default=20)
    add_config_flags(summ, only=("data",))
    allow_outside_flag(summ)
    summ.set_defaults(func=cmd_data_summarize)

    for job in ("train", "tune", "evaluate", "predict"):  # the stages that also run as Ray jobs
        add_arguments, func, help_ = stages.STAGES[job]
        add_arguments(sp := sub.add_parser(job, help=help_, description=help_))
        sp.set_defaults(func=func)

    jobs_p = sub.add_parser("jobs", help="run the stages on a Ray cluster (Ray Jobs API)")
    jobs_sub = jobs_p.add_subparsers(dest="jobs_command", required=True)
    address_help = "the head's Jobs API, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)"
    submit = jobs_sub.add_parser(
        "submit", help="submit a stage as a Ray job: deepfake jobs submit JOB [options] -- ARGS FOR THE JOB"
    ).add_subparsers(dest="job", required=True)
    for job in ("train", "tune", "evaluate", "predict", "serve"):
        jp = submit.add_parser(job, help=f"the `{job}` job (arguments after --)")
        jp.add_argument("--address", help=address_help)
        jp.add_argument("--no-wait", action="store_true", help="print the job id and return")
        src = jp.add_mutually_exclusive_group()
        src.add_argument("--working-dir", help="source checkout to upload (default: this checkout)")
        src.add_argument("--installed", action="store_true", help="use the package installed on the cluster")
        jp.add_argument("--pip", action="append", default=[], metavar="PKG", help="extra pip package for the job")
        jp.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable")
        jp.add_argument("--submission-id", help="job id to use (default: generated)")
        jp.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver itself")
        jp.add_argument("args", nargs="*", help="arguments for the job, after --")
        jp.set_defaults(func=cmd_jobs_submit)
    for name, func, help_ in (
        ("status", cmd_jobs_status, "a job's status and message"),
        ("logs", cmd_jobs_logs, "a job's logs"),
        ("stop", cmd_jobs_stop, "stop a job"),
    ):
        jq = jobs_sub.add_parser(name, help=help_)
        jq.add_argument("job_id")
        jq.add_argument("--address", help=address_help)
        jq.set_defaults(func=func)
        if name == "logs":
            jq.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
        if name == "stop":
            jq.add_argument("--no-wait", dest="wait", action="store_false", help="don't wait for it to stop")
            jq.add_argument("--timeout", type=float, default=60.0)
    jl = jobs_sub.add_parser("list", help="jobs on the cluster")
    jl.add_argument("--address", help=address_help)
    jl.set_defaults(func=cmd_jobs_list)

    en = sub.add_parser("ensemble", help="combine prediction CSVs (filename,class,prob_ai) by vote or mean")
    en.add_argument("csv", nargs="+", help="prediction CSVs, one per model")
    en.add_argument("-o", "--output", required=True, help="combined CSV")
    en.add_argument("--method", choices=("vote", "mean"), default="vote", help="majority vote (ties: mean) or mean")
    en.set_defaults(func=cmd_ensemble)

    me = sub.add_parser(
        "make-ensemble",
        help="an ensemble model folder: members by reference, its own operating points, usable as --model",
    )
    allow_outside_flag(me)
    me.add_argument("out", help="the new ensemble folder (e.g. models/cifake-ensemble)")
    me.add_argument("members", nargs="+", help="member model folders (two or more), each calibrated")
    me.add_argument("--data", help="dataset for its operating points (default: the members' training data)")
    me.add_argument("--band", default="0.2,0.8", help="LO,HI: mean calibrated P(ai) in this band is 'uncertain'")
    me.add_argument("--no-calibrate", action="store_true", help="write the folder only (no operating points)")
    me.add_argument("--overwrite", action="store_true", help="replace an existing folder at OUT")
    me.set_defaults(func=cmd_make_ensemble)

    ex = sub.add_parser("explain", help="Grad-CAM heatmaps: overlay PNG + .npy per image, and a contact sheet")
    ex.add_argument("images", nargs="+", metavar="IMAGE")
    ex.add_argument("--model", metavar="DIR", help=f"model folder ({SHIPPED_HELP})")
    ex.add_argument("-o", "--output", required=True, help="output folder")
    ex.add_argument("--target", help="class to explain, e.g. ai or real (default: each image's predicted class)")
    ex.add_argument("--batch-size", type=int, default=16, help="images per Grad-CAM forward/backward")
    ex.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ex.add_argument("--operating-point", "--threshold", dest="operating_point", help=OP_HELP)
    ex.add_argument("--c2pa-trust", metavar="PEM", help="trusted root certificates for C2PA signers")
    ex.set_defaults(func=cmd_explain)

    ca = sub.add_parser(
        "calibrate", help="fit a model's temperature, operating points and out-of-domain guard on its own data"
    )
    allow_outside_flag(ca)
    ca.add_argument("--model", metavar="DIR", help=f"model folder ({SHIPPED_HELP})")
    ca.add_argument("--data", help="dataset (default: the data the model was trained on, split as in training)")
    ca.add_argument("--fit-images", type=int, default=10_000, help="training images for the guard's statistics")
    ca.add_argument("--band", default="0.2,0.8", help="LO,HI: calibrated P(ai) in this band is 'uncertain'")
    ca.add_argument(
        "--guard-features",
        choices=("deep+low", "low"),
        default="deep+low",
        help="the guard's features: pooled activations of several depths + low-level image statistics, or the "
        "low-level statistics alone (measure with bench/ood_guard.py)",
    )
    ca.add_argument("--flag-rate", type=float, default=0.01, help="share of in-domain validation images flagged")
    ca.add_argument("--batch-size", type=int, default=64)
    ca.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ca.add_argument("--remove", action="store_true", help="drop the folder's calibration and guard instead")
    ca.set_defaults(func=cmd_calibrate)

    pv = sub.add_parser("provenance", help="C2PA manifests and generator metadata per file, as JSON lines")
    pv.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (recursively)")
    pv.add_argument("--c2pa-trust", metavar="PEM", help="trusted root certificates for C2PA signers")
    pv.add_argument(
        "--c2pa-remote", action="store_true", help="let C2PA fetch a manifest the file only links to (network)"
    )
    pv.set_defaults(func=cmd_provenance)

    cd = sub.add_parser("card", help="regenerate a model folder's card (README.md) from its metadata")
    cd.add_argument("model", nargs="?", metavar="DIR", help=f"model folder ({SHIPPED_HELP})")
    cd.add_argument("--limitations", help="text (or @FILE) for the card's Limitations section")
    cd.set_defaults(func=cmd_card)

    sv = sub.add_parser("serve", help="HTTP API + web page with Ray Serve (blocks until Ctrl-C)")
    sv.add_argument("--config", help="Serve config (default: serve_config.yaml in the cwd or the repository)")
    sv.add_argument("--model", metavar="DIR", help="model folder (overrides the config's args.model)")
    sv.add_argument(
        "--models-dir",
        metavar="DIR",
        help="folder of model folders a request may name with ?model=NAME (default: the default model's folder)",
    )
    sv.add_argument("--port", type=int, help="HTTP port (overrides the config; default 8000)")
    sv.add_argument("--host", help="HTTP host (default 127.0.0.1; beyond it, set API keys)")
    sv.add_argument(
        "--api-keys",
        metavar="FILE",
        help="accepted API keys, one per line (or DEEPFAKE_API_KEYS); default: none needed",
    )
    sv.add_argument("--rate-limit", type=float, metavar="R", help="requests/s per API key (429 beyond it)")
    sv.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    sv.add_argument("--operating-point", "--threshold", dest="operating_point", help=OP_HELP)
    sv.add_argument("--c2pa-trust", metavar="PEM", help="trusted root certificates for C2PA signers")
    sv.add_argument(
        "--http-path",
        choices=("auto", "haproxy", "proxy"),
        default="auto",
        help="embedded Ray only: HAProxy + direct ingress to the replicas (auto: where a binary exists) or "
        "Serve's Python proxy actor",
    )
    sv.set_defaults(func=cmd_serve)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=cfgmod.LOG_FORMAT,
    )
    return stages.run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())

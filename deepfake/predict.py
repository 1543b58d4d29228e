"""Batch prediction at scale with Ray Data: a folder, a tar archive or a CSV manifest -> a predictions CSV.

Pipeline: a read stage yields blocks of (filename, bytes) — files read by parallel tasks, an archive
streamed once, front to back, by one task (a .tar.gz cannot be random-accessed cheaply) — then an actor
pool of `BatchPredictor`s decodes with `decode_image` and runs the shared `Predictor`, and the driver
appends rows to the CSV as batches arrive (flushed each time), so memory stays bounded and an interrupted
run loses nothing. A file that does not decode becomes a row with its reason in `error`, never a crash.

Resume is the default: rows already in the output CSV (same model) are kept as they are and skipped;
`overwrite=True` starts the file afresh.
"""

from __future__ import annotations

import csv
import logging
import os
import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from deepfake.calibration import parse_operating_point
from deepfake.checkpoint import CheckpointError
from deepfake.data import DataError, is_archive, is_hidden, is_manifest, read_manifest, stream_archive, walk_folder
from deepfake.files import FileTooLarge, read_capped, safe_cell, unsafe_cell
from deepfake.images import IMAGE_SUFFIXES, BadImage, decode_image
from deepfake.inference import Scorer, load_scorer, scorer_info
from deepfake.provenance import load_trust, read_provenance

log = logging.getLogger(__name__)

# class: P(ai) >= the operating threshold; verdict: ai, real or uncertain (see deepfake.calibration)
COLUMNS = [
    "filename",
    "class",
    "verdict",
    "prob_ai",
    "prob_ai_raw",
    "in_domain",
    "domain_score",
    "reason",
    "operating_point",
    "provenance",
    "provenance_reason",
    "model",
    "error",
]
ROWS_PER_BLOCK = 512  # rows per Ray Data block from the read stage
MAX_BLOCK_BYTES = 32 * 1024 * 1024  # ... or fewer when the images are large


# ---------------------------------------------------------------------------------------------- core (no Ray)
def is_image_name(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not any(is_hidden(p) for p in parts) and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def predict_rows(
    scorer: Scorer,
    filenames: Sequence[str],
    datas: Sequence[bytes | None],
    errors: Sequence[str],
    c2pa_trust: str | None = None,
) -> dict[str, np.ndarray]:
    """Decode + predict one batch; an input that arrives with an error or does not decode becomes an error row.
    The scorer is one model or an ensemble (`deepfake.inference.load_scorer`).
    Each row also carries the file's provenance (C2PA, generator metadata), read from its original bytes."""
    version = scorer.version
    n = len(filenames)
    rows: list[dict[str, Any]] = [
        {**dict.fromkeys(COLUMNS, ""), "in_domain": None, "domain_score": None} for _ in range(n)
    ]
    images, index = [], []
    for i, (data, err) in enumerate(zip(datas, errors)):
        rows[i]["error"] = err or ""
        if err:
            continue
        try:
            images.append(decode_image(data or b""))
            index.append(i)
        except BadImage as e:
            rows[i]["error"] = e.reason
            continue
        prov = read_provenance(data or b"", c2pa_trust)
        rows[i].update({"provenance": prov["provenance"], "provenance_reason": prov["reason"]})
    if images:
        for i, answer in zip(index, scorer.predict_images(images)):
            rows[i].update(answer)
    out = {c: np.array([r.get("label", "") if c == "class" else r[c] for r in rows], dtype=object) for c in COLUMNS}
    out["filename"] = np.asarray(filenames, dtype=object)
    out["model"] = np.full(n, version, dtype=object)
    out["prob_ai"] = np.array([np.nan if r["prob_ai"] == "" else r["prob_ai"] for r in rows], dtype=np.float64)
    out["prob_ai_raw"] = np.array([np.nan if r["prob_ai_raw"] == "" else r["prob_ai_raw"] for r in rows])
    return out


class BatchPredictor:
    """The map_batches actor: loads the model(s) once, then decodes + predicts batches of bytes."""

    def __init__(
        self,
        model_dirs: list[str],
        threads: int | None = None,
        operating_point: str | None = None,
        c2pa_trust: str | None = None,
    ):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.scorer = load_scorer(model_dirs, operating_point=operating_point, jit=True)  # traced on CPU: faster
        self.c2pa_trust = c2pa_trust

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return predict_rows(
            self.scorer, list(batch["filename"]), list(batch["data"]), list(batch["error"]), self.c2pa_trust
        )


# ---------------------------------------------------------------------------------------------- inputs
def list_files(path: Path, allow_outside: bool = False) -> list[tuple[str, str]]:
    """(output filename, file path) for every image under a folder (recursively), a manifest, or one file.
    `allow_outside`: a manifest may name files outside its own folder (data.read_manifest)."""
    if path.is_dir():
        rels = ((p.relative_to(path).as_posix(), p) for _, p in walk_folder(path))
        return [(rel, str(p)) for rel, p in rels if is_image_name(rel)]
    if is_manifest(path):
        df = read_manifest(path, need_label=False, allow_outside=allow_outside)
        return list(zip(df["name"], df["path"]))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [(path.name, str(path))]
    raise DataError(f"{path}: expected a folder, a .tar/.tar.gz archive, a CSV manifest (path column) or an image")


def _blocks(rows: Iterable[tuple[str, bytes | None, str]], rows_per_block: int) -> Iterator[Any]:
    """Group (filename, bytes, error) rows into Arrow tables of at most rows_per_block rows / MAX_BLOCK_BYTES."""
    import pyarrow as pa

    names: list[str] = []
    datas: list[bytes | None] = []
    errs: list[str] = []
    size = 0

    def table():
        return pa.table(
            {
                "filename": pa.array(names, pa.string()),
                "data": pa.array(datas, pa.large_binary()),
                "error": pa.array(errs, pa.string()),
            }
        )

    for name, data, err in rows:
        names.append(name)
        datas.append(data)
        errs.append(err)
        size += len(data or b"")
        if len(names) >= rows_per_block or size >= MAX_BLOCK_BYTES:
            yield table()
            names, datas, errs, size = [], [], [], 0
    if names:
        yield table()


def read_files(pairs: Sequence[tuple[str, str]]) -> Iterator[tuple[str, bytes | None, str]]:
    for name, p in pairs:
        try:
            yield name, read_capped(p), ""
        except FileTooLarge as e:
            yield name, None, f"too_large: {e}"
        except OSError as e:
            yield name, None, f"unreadable: {e.strerror or e}"


def read_archive(archive: str, skip: frozenset[str] | set[str]) -> Iterator[tuple[str, bytes | None, str]]:
    """Stream image members front to back; a damaged archive ends with one error row instead of a crash."""
    n = 0
    try:
        for row in stream_archive(archive, lambda name: is_image_name(name) and name not in skip):
            yield row
            n += 1
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        log.error("%s: archive unreadable after %d members: %s", archive, n, e)
        yield f"{Path(archive).name}::<after {n} members>", None, f"archive_damaged: {e}"


def _datasource(pairs: list[tuple[str, str]] | None, archive: str | None, skip: set[str], rows_per_block: int):
    """A Ray Data source of (filename, data, error) blocks: file chunks in parallel, or one archive stream."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ImageBytesDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return os.path.getsize(archive) if archive else None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
            def meta(n):
                return BlockMetadata(num_rows=n, size_bytes=None, exec_stats=None, input_files=None)

            if archive is not None:
                frozen = frozenset(skip)
                return [ReadTask(lambda: _blocks(read_archive(archive, frozen), rows_per_block), meta(None))]
            chunks = [pairs[i : i + rows_per_block] for i in range(0, len(pairs), rows_per_block)]
            return [ReadTask(lambda c=c: _blocks(read_files(c), rows_per_block), meta(len(c))) for c in chunks]

    return ImageBytesDatasource()


# ---------------------------------------------------------------------------------------------- output + resume
def _drop_partial_last_line(path: Path) -> None:
    """A run killed mid-write can leave half a row: cut it (it was never a finished row)."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        if end == 0:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        pos = end
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            k = chunk.rfind(b"\n")
            if k >= 0:
                f.truncate(pos - step + k + 1)
                log.warning("%s: dropped an unfinished last row", path)
                return
            pos -= step
        f.truncate(0)


HEADER = ",".join(COLUMNS)


def check_output(out_csv: Path) -> None:
    """Refuse an existing -o that is not a predictions CSV of ours, before anything touches it (resume cuts a
    half-written last row; --overwrite replaces the file): an unrelated file is never changed."""
    if not out_csv.exists():
        return
    if not out_csv.is_file():
        raise DataError(f"-o {out_csv}: not a file")
    if out_csv.stat().st_size == 0:
        return
    with open(out_csv, "rb") as f:
        first = f.readline(len(HEADER) + 3)
    if first.rstrip(b"\r\n") != HEADER.encode():
        raise DataError(
            f"-o {out_csv}: an existing file that is not a deepfake predictions CSV (its first line is not the "
            f"header {HEADER!r}); it was left untouched: choose another output file"
        )


def finished_rows(out_csv: Path, version: str) -> set[str]:
    """Filenames already in the output (any row, error rows too); refuses a file from another model."""
    check_output(out_csv)
    if not out_csv.exists() or out_csv.stat().st_size == 0:
        return set()
    _drop_partial_last_line(out_csv)
    if out_csv.stat().st_size == 0:
        return set()
    try:
        df = pd.read_csv(out_csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{out_csv}: not a predictions CSV ({e}); use --overwrite or another -o") from None
    if list(df.columns) != COLUMNS:
        raise DataError(
            f"{out_csv}: columns {list(df.columns)} are not {COLUMNS}; use --overwrite or another output file"
        )
    others = set(df["model"]) - {version, ""}
    if others:
        raise DataError(
            f"{out_csv} holds predictions of {sorted(others)}, not {version}: use --overwrite or another -o"
        )
    return {unsafe_cell(name) for name in df["filename"]}


def _format_prob(x: float) -> str:
    return "" if x != x else repr(float(x))  # NaN (error rows) -> empty; repr round-trips exactly


def _cell(column: str, value: Any) -> str:
    """A CSV cell: probabilities round-trip exactly, booleans as true/false, None (no guard, error row) empty."""
    if column in ("prob_ai", "prob_ai_raw"):
        return _format_prob(value)
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    return safe_cell(str(value))  # a filename like "=cmd|..." must not run as a spreadsheet formula


# ---------------------------------------------------------------------------------------------- driver
def resources(concurrency: int | None, gpus_per_replica: float | None, read_cpus: float) -> dict[str, Any]:
    """Actor pool size and per-actor resources for this cluster. GPUs: one replica per `gpus_per_replica`
    GPUs. CPUs: the cores left by the reader, shared by the replicas (torch threads to match)."""
    import ray

    total = ray.cluster_resources()
    gpus = float(total.get("GPU", 0))
    cpus = float(total.get("CPU", 1))
    if gpus > 0 and gpus_per_replica != 0:
        per = gpus_per_replica or 1.0
        n = concurrency or max(1, int(gpus // per))
        cpu_each = max(0.5, min(4.0, (cpus - read_cpus) / n))  # decoding + preprocessing feed the GPU
        return {"concurrency": n, "num_gpus": per, "num_cpus": cpu_each, "threads": max(1, int(cpu_each))}
    n = concurrency or max(1, int(cpus // 2))  # 2 threads per replica: less per-actor overhead on small nodes
    cpu_each = max(0.1, (cpus - read_cpus) / n)
    return {"concurrency": n, "num_gpus": 0, "num_cpus": cpu_each, "threads": max(1, round(cpu_each))}


def predict(
    model_dirs: str | Path | Sequence[str | Path],
    path: str | Path,
    out_csv: str | Path,
    batch_size: int = 64,
    concurrency: int | None = None,
    gpus_per_replica: float | None = None,
    overwrite: bool = False,
    address: str | None = None,
    progress: bool = True,
    operating_point: str | float | None = None,
    c2pa_trust: str | Path | None = None,
    allow_outside: bool = False,
) -> dict[str, Any]:
    """Predict every image under `path` into `out_csv` (resuming it unless `overwrite`); returns a summary.
    `operating_point`: a threshold, "fpr=F" or "eer" from the (first) model's calibration; default 0.5.
    `allow_outside`: a manifest may name files outside its folder."""
    import ray

    from deepfake.cluster import connect

    t0 = time.perf_counter()
    dirs = [str(model_dirs)] if isinstance(model_dirs, (str, Path)) else [str(d) for d in model_dirs]
    if not dirs:
        raise CheckpointError("no model given")
    info = scorer_info(dirs)  # fail fast, before Ray starts
    parse_operating_point(operating_point, info["operating_points"])
    trust_pem = load_trust(c2pa_trust)
    version = info["version"]
    src = Path(path).expanduser()
    if not src.exists():
        raise DataError(f"input not found: {path}")
    out = Path(out_csv)
    check_output(out)  # an unrelated file is refused untouched, --overwrite or not
    out.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and out.exists():
        out.unlink()
    done = finished_rows(out, version)
    if done:
        log.info("%s: %d rows already written; predicting the rest", out, len(done))

    archive = str(src.resolve()) if src.is_file() and is_archive(src) else None
    pairs = None if archive else [(n, p) for n, p in list_files(src, allow_outside) if n not in done]
    todo = None if archive else len(pairs)
    summary: dict[str, Any] = {
        "source": str(path),
        "output": str(out),
        "model": version,
        "already_done": len(done),
        "predicted": 0,
        "errors": 0,
        "verdicts": {},
    }
    if todo == 0:
        log.info("nothing left to predict")
        return {**summary, "seconds": round(time.perf_counter() - t0, 3)}

    connect(address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar: ours, in rows written
    read_cpus = 0.5 if archive else 0.25
    res = resources(concurrency, gpus_per_replica, read_cpus)
    log.info(
        "predicting with %d replica(s) (%s CPU, %s GPU, %d torch threads each), batch %d",
        res["concurrency"],
        round(res["num_cpus"], 2),
        res["num_gpus"],
        res["threads"],
        batch_size,
    )
    ds = ray.data.read_datasource(
        _datasource(pairs, archive, done, min(ROWS_PER_BLOCK, max(batch_size, 32))), num_cpus=read_cpus
    ).map_batches(
        BatchPredictor,
        fn_constructor_kwargs={
            "model_dirs": dirs,
            "threads": res["threads"],
            "operating_point": operating_point,
            "c2pa_trust": trust_pem,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=res["concurrency"]),
        num_cpus=res["num_cpus"],
        num_gpus=res["num_gpus"] or None,
    )

    write_header = not out.exists() or out.stat().st_size == 0
    t_first, first_rows = None, 0
    with open(out, "a", newline="") as f, tqdm(total=todo, unit="img", disable=not progress, mininterval=2) as bar:
        writer = csv.writer(f)
        if write_header:
            writer.writerow(COLUMNS)
            f.flush()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows = [[_cell(c, batch[c][i]) for c in COLUMNS] for i in range(len(batch["filename"]))]
            writer.writerows(rows)
            f.flush()
            n_err = int(sum(1 for e in batch["error"] if e))
            for v in batch["verdict"]:
                if v:
                    summary["verdicts"][v] = summary["verdicts"].get(v, 0) + 1
            summary["errors"] += n_err
            summary["predicted"] += len(rows) - n_err
            bar.update(len(rows))
            if t_first is None:
                t_first, first_rows = time.perf_counter(), len(rows)
    t_end = time.perf_counter()
    new = summary["predicted"] + summary["errors"]
    summary.update(
        {
            "rows_written": new,
            "seconds": round(t_end - t0, 3),
            "startup_s": round((t_first or t_end) - t0, 3),
            "images_per_s": round(new / max(t_end - t0, 1e-9), 1),
            "steady_images_per_s": round((new - first_rows) / (t_end - t_first), 1)
            if t_first and t_end > t_first and new > first_rows
            else None,
            "replicas": res["concurrency"],
        }
    )
    log.info("%d rows written to %s (%d errors) in %.1f s", new, out, summary["errors"], t_end - t0)
    return summary

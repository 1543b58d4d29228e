"""Labelled image datasets: discovery, validation, de-duplicated stratified splits, torch Datasets.

A dataset source is a folder (`ai/` + `real/`, `FAKE/` + `REAL/`, at any depth), a CSV manifest
(`path,label`) or a tar archive of either folder layout, read in place. Every file is read once, hashed
and test-decoded by `scan`; files that cannot be decoded are reported with a reason and left out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd
import torch
from tqdm import tqdm

from deepfake.files import FileTooLarge, check_size, read_capped
from deepfake.images import BadImage, decode_image
from deepfake.labels import CLASSES, LABEL_SYNONYMS, canonical_label

log = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).parent / "sample"  # a few hundred CIFAKE images shipped for quickstart and tests
ARCHIVE_SEP = "::"  # ref of an archive member: "<archive path>::<member name>"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


CIFAKE_CREDITS = (
    "CIFAKE (Bird & Lotfi, IEEE Access 2024, arXiv:2303.14126; MIT licence): REAL images from CIFAR-10 "
    "(Krizhevsky & Hinton 2009, MIT licence), FAKE images generated with Stable Diffusion 1.4"
)


def data_credits(source: str) -> str | None:
    """Credit line for the model card: a CREDITS.md beside the data wins; CIFAKE is recognised by name."""
    p = Path(source)
    for name in ("CREDITS.md", "CREDITS.txt", "CREDITS"):
        if p.is_dir() and (p / name).is_file():
            return (p / name).read_text().strip().splitlines()[0].lstrip("# ").strip()
    return CIFAKE_CREDITS if "cifake" in str(source).lower() else None


class DataError(ValueError):
    """A dataset that cannot be used at all (missing, empty, unlabelled); the message says how to fix it."""


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(TAR_SUFFIXES)


def _label_from_parts(parts: Iterable[str]) -> str | None:
    """The nearest enclosing folder whose name is a label decides (so `train/FAKE/x.jpg` is ai)."""
    for part in reversed(list(parts)):
        label = canonical_label(part)
        if label is not None:
            return label
    return None


def is_hidden(name: str) -> bool:
    """A dot-file or folder, or macOS archive debris: never a dataset file."""
    return name.startswith(".") or name.startswith("__MACOSX")


# ---------------------------------------------------------------------------------------------- discovery
@dataclass
class Candidate:
    ref: str
    label: str
    data: bytes | None = None  # already read (archives are streamed once); None: read from ref
    error: tuple[str, str] | None = None  # (reason, detail) when it is known unusable before reading


def walk_folder(root: Path) -> Iterator[tuple[tuple[str, ...], Path]]:
    """Every visible file under `root` in a stable order: (its folder parts relative to root, its path).
    The one folder walk of training, evaluation and prediction."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        rel_parts = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            if not is_hidden(name):
                yield rel_parts, Path(dirpath) / name


def stream_archive(
    archive: str | Path, want: Callable[[str], bool] = lambda name: True
) -> Iterator[tuple[str, bytes | None, str]]:
    """(member name, bytes, "") for each visible file member that `want`s its name, front to back in one pass;
    a member over the size cap comes as (name, None, "too_large: ...") unread. The one archive reader of
    training, evaluation and prediction; a damaged archive raises tarfile/zlib/OSError to the caller."""
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tar:
            if not member.isfile() or any(is_hidden(p) for p in PurePosixPath(member.name).parts):
                continue
            if not want(member.name):
                continue
            try:
                check_size(f"{Path(archive).name}{ARCHIVE_SEP}{member.name}", member.size)
            except FileTooLarge as e:
                yield member.name, None, f"too_large: {e}"  # never read into memory
                continue
            f = tar.extractfile(member)
            yield member.name, f.read() if f is not None else b"", ""


def _discover_folder(root: Path) -> Iterator[Candidate]:
    for rel_parts, path in walk_folder(root):
        label = _label_from_parts(rel_parts)
        if label is not None:
            yield Candidate(str(path), label)


def _discover_archive(archive: Path) -> Iterator[Candidate]:
    def labelled(name: str) -> bool:
        return _label_from_parts(PurePosixPath(name).parts[:-1]) is not None

    for name, data, error in stream_archive(archive, labelled):
        label = _label_from_parts(PurePosixPath(name).parts[:-1])
        ref = f"{archive}{ARCHIVE_SEP}{name}"
        if error:
            reason, _, detail = error.partition(": ")
            yield Candidate(ref, label, error=(reason, detail))
        else:
            yield Candidate(ref, label, data)


def is_manifest(path: str | Path) -> bool:
    return str(path).lower().endswith((".csv", ".csv.gz"))


def read_manifest(csv_path: Path, need_label: bool = True, allow_outside: bool = False) -> pd.DataFrame:
    """A CSV manifest as (name as written, path resolved against the manifest's folder[, label]): the one
    reader of manifests for training, evaluation and prediction. Paths that leave the manifest's folder
    (absolute, or through ..) are refused unless `allow_outside`: a manifest from elsewhere must not make the
    tool read arbitrary files on this machine."""
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    cols = {c.lower().strip(): c for c in df.columns}
    wanted = ("path", "label") if need_label else ("path",)
    if any(c not in cols for c in wanted):
        raise DataError(
            f"{csv_path}: a manifest needs the column(s) {','.join(wanted)} (found: {', '.join(df.columns)})"
        )
    base = csv_path.parent.resolve()
    names = [p for p in df[cols["path"]]]
    keep = [bool(p) for p in names]
    paths = [(base / p).resolve() if p else base for p in names]
    outside = [n for n, p, k in zip(names, paths, keep) if k and not p.is_relative_to(base)]
    if outside and not allow_outside:
        raise DataError(
            f"{csv_path}: {len(outside)} path(s) lead outside the manifest's folder {base} (e.g. {outside[:3]}); "
            "move the manifest next to the images, or pass --allow-outside if you trust it"
        )
    out = pd.DataFrame({"name": names, "path": [str(p) for p in paths]})
    if need_label:
        labels = df[cols["label"]]
        bad = sorted({v for v, k in zip(labels, keep) if k and canonical_label(v) is None})
        if bad:
            raise DataError(
                f"{csv_path}: unknown labels {bad[:5]}; use one of {sorted(LABEL_SYNONYMS)} (case-insensitive)"
            )
        out["label"] = [canonical_label(v) for v in labels]
    return out[keep].reset_index(drop=True)


def _discover_manifest(csv_path: Path, allow_outside: bool = False) -> Iterator[Candidate]:
    for row in read_manifest(csv_path, allow_outside=allow_outside).itertuples():
        yield Candidate(row.path, row.label)


def discover(path: str | Path, allow_outside: bool = False) -> tuple[str, Iterator[Candidate]]:
    """Recognise the layout of `path` and list its labelled files lazily."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise DataError(f"dataset not found: {path}")
    if p.is_dir():
        return "folder", _discover_folder(p)
    if is_archive(p):
        return "archive", _discover_archive(p)
    if is_manifest(p):
        return "manifest", _discover_manifest(p, allow_outside)
    raise DataError(f"{path}: expected a folder, a CSV manifest (path,label) or a .tar/.tar.gz archive")


# ---------------------------------------------------------------------------------------------- reading
def read_ref(ref: str) -> bytes:
    """Bytes of one file or archive member (slow for compressed archives: use a BlobStore for many);
    FileTooLarge over deepfake.files.MAX_FILE_BYTES, before reading it."""
    if ARCHIVE_SEP in ref:
        archive, member = ref.split(ARCHIVE_SEP, 1)
        with tarfile.open(archive, mode="r:*") as tar:
            info = tar.getmember(member)
            check_size(ref, info.size)
            f = tar.extractfile(info)
            if f is None:
                raise FileNotFoundError(ref)
            return f.read()
    return read_capped(ref)


class BlobStore:
    """Bytes by ref: archive members are loaded in one streaming pass and kept; plain files read on demand."""

    def __init__(self, refs: Iterable[str] = ()):
        self._members: dict[str, bytes] = {}
        wanted: dict[str, set[str]] = {}
        for ref in refs:
            if ARCHIVE_SEP in ref:
                archive, member = ref.split(ARCHIVE_SEP, 1)
                wanted.setdefault(archive, set()).add(member)
        for archive, members in wanted.items():
            with tarfile.open(archive, mode="r:*") as tar:
                for m in tar:
                    if m.name in members and m.isfile():
                        check_size(f"{archive}{ARCHIVE_SEP}{m.name}", m.size)
                        f = tar.extractfile(m)
                        self._members[f"{archive}{ARCHIVE_SEP}{m.name}"] = f.read() if f else b""
            missing = len(members) - sum(1 for m in members if f"{archive}{ARCHIVE_SEP}{m}" in self._members)
            if missing:
                raise DataError(f"{archive}: {missing} members listed in the split are missing from the archive")

    def read(self, ref: str) -> bytes:
        if ARCHIVE_SEP in ref:
            return self._members[ref]
        return read_capped(ref)


# ---------------------------------------------------------------------------------------------- scanning
@dataclass
class Catalog:
    """What a scan found: usable samples (ref, label, sha256, bytes) and skipped files with reasons."""

    source: str
    layout: str
    samples: pd.DataFrame
    skipped: pd.DataFrame
    blobs: dict[str, bytes] = field(default_factory=dict, repr=False)  # archive members read during the scan


def scan(path: str | Path, keep_blobs: bool = False, progress: bool = True, allow_outside: bool = False) -> Catalog:
    """Read, hash and test-decode every labelled file; never raises for a bad file, only lists it.
    `allow_outside`: a manifest may name files outside its own folder."""
    layout, candidates = discover(path, allow_outside)
    rows, skipped, blobs = [], [], {}
    for c in tqdm(candidates, desc=f"scan {Path(path).name}", unit="img", disable=not progress, mininterval=2):
        if c.error is not None:
            skipped.append((c.ref, c.label, *c.error))
            continue
        try:
            data = c.data if c.data is not None else read_ref(c.ref)
        except FileTooLarge as e:
            skipped.append((c.ref, c.label, "too_large", str(e)))
            continue
        except OSError as e:
            skipped.append((c.ref, c.label, "unreadable", str(e)))
            continue
        try:
            decode_image(data)
        except BadImage as e:
            skipped.append((c.ref, c.label, e.reason, e.detail))
            continue
        rows.append((c.ref, c.label, hashlib.sha256(data).hexdigest(), len(data)))
        if keep_blobs and c.data is not None:
            blobs[c.ref] = data
    samples = pd.DataFrame(rows, columns=["ref", "label", "sha256", "bytes"])
    skipped_df = pd.DataFrame(skipped, columns=["ref", "label", "reason", "detail"])
    if samples.empty:
        raise DataError(
            f"{path}: no usable labelled images found ({len(skipped_df)} skipped). Expected folders named "
            "ai/ + real/ or FAKE/ + REAL/ (any depth), or a CSV manifest with path,label"
        )
    for reason, n in Counter(skipped_df["reason"]).items():
        log.warning("skipped %d files: %s", n, reason)
    return Catalog(str(path), layout, samples, skipped_df, blobs)


# ---------------------------------------------------------------------------------------------- splitting
def _order_key(sha: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()


def split_samples(
    samples: pd.DataFrame,
    val_ratio: float = 0.1,
    test_ratio: float = 0.1,
    seed: int = 0,
    max_per_class: int | None = None,
) -> pd.DataFrame:
    """Assign train/val/test per class by content hash: deterministic, independent of file order, and
    byte-identical duplicates always land on the same side. Returns `samples` with a `split` column."""
    if not (0 <= val_ratio < 1 and 0 <= test_ratio < 1 and val_ratio + test_ratio < 1):
        raise DataError(f"split ratios must be in [0, 1) and sum below 1 (val={val_ratio}, test={test_ratio})")
    df = samples.copy()
    # A duplicate group follows the label most of its copies carry (ties: alphabetical), so it is split once.
    group_label = df.groupby("sha256")["label"].agg(lambda s: sorted(s.mode())[0])
    df["group_label"] = df["sha256"].map(group_label)
    df["split"] = ""
    keep = pd.Series(True, index=df.index)
    for label in sorted(df["group_label"].unique()):
        sizes = df[df["group_label"] == label].groupby("sha256").size()
        order = sorted(sizes.index, key=lambda s: _order_key(s, seed))
        if max_per_class is not None:
            total, capped = 0, []
            for sha in order:
                if total >= max_per_class:
                    break
                capped.append(sha)
                total += int(sizes[sha])
            order = capped
        n = len(order)
        n_test = int(round(n * test_ratio))
        n_val = int(round(n * val_ratio))
        if n >= 3:  # a split asked for gets at least one group
            n_test = max(n_test, 1 if test_ratio > 0 else 0)
            n_val = max(n_val, 1 if val_ratio > 0 else 0)
        assign = {sha: "test" for sha in order[:n_test]}
        assign.update({sha: "val" for sha in order[n_test : n_test + n_val]})
        assign.update({sha: "train" for sha in order[n_test + n_val :]})
        mask = df["group_label"] == label
        df.loc[mask, "split"] = df.loc[mask, "sha256"].map(assign).fillna("")
        keep &= ~(mask & (df["split"] == ""))
    return df[keep].drop(columns=["group_label"]).sort_values(["split", "label", "ref"]).reset_index(drop=True)


def report(catalog: Catalog, split: pd.DataFrame | None = None) -> dict:
    """A JSON-able data summary: counts per class (and split), duplicates, skipped files with reasons."""
    s = catalog.samples
    dup_sizes = s.groupby("sha256").size()
    conflicts = s.groupby("sha256")["label"].nunique()
    out = {
        "source": catalog.source,
        "layout": catalog.layout,
        "images": int(len(s)),
        "per_class": {k: int(v) for k, v in sorted(Counter(s["label"]).items())},
        "duplicate_groups": int((dup_sizes > 1).sum()),
        "duplicate_images": int(dup_sizes[dup_sizes > 1].sum()),
        "label_conflicts": int((conflicts > 1).sum()),
        "skipped": int(len(catalog.skipped)),
        "skipped_by_reason": {k: int(v) for k, v in sorted(Counter(catalog.skipped["reason"]).items())},
        "skipped_files": catalog.skipped[["ref", "reason"]].to_dict("records"),
    }
    if split is not None:
        out["splits"] = {
            name: {k: int(v) for k, v in sorted(Counter(g["label"]).items())} for name, g in split.groupby("split")
        }
    return out


# ---------------------------------------------------------------------------------------------- torch side
class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, class index) from refs; decoding happens here, in the loader, not up front."""

    def __init__(self, refs: list[str], labels: list[str], transform: Callable, store: BlobStore):
        self.refs = list(refs)
        self.targets = [CLASSES.index(label) for label in labels]
        self.transform = transform
        self.store = store

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        img = decode_image(self.store.read(self.refs[i]))
        return self.transform(img), self.targets[i]

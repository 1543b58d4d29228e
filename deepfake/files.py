"""Files written so that nothing is ever half-written or clobbered, and read with a bound on their size.

- A file is written to a hidden sibling, flushed to disk and renamed over the target: a reader (or a crash)
  sees the old file or the new one, never a mix.
- A folder (a model export) is built in a hidden sibling folder, flushed, then swapped in: killed midway, the
  previous folder is still there as it was.
- CSV cells that a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, CR) get a leading `'`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

MAX_FILE_BYTES = 256 * 1024 * 1024  # one image file or archive member: far above any photo, below a memory hazard
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class FileTooLarge(ValueError):
    """An input file or archive member over the size cap; the message names it."""


def check_size(name: str, size: int | None, limit: int | None = None) -> None:
    """Refuse an input of `size` bytes over `limit` (default MAX_FILE_BYTES) before reading it."""
    limit = MAX_FILE_BYTES if limit is None else limit
    if size is not None and size > limit:
        raise FileTooLarge(f"{name}: {size / 2**20:.1f} MiB is over the {limit / 2**20:.0f} MiB limit per file")


def read_capped(path: str | Path, limit: int | None = None) -> bytes:
    """A whole file, refused (FileTooLarge) when it is over `limit` bytes."""
    p = Path(path)
    check_size(str(p), p.stat().st_size, limit)
    return p.read_bytes()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened and synced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | Path, data: str | bytes, mode: int = 0o644) -> Path:
    """Write `data` to `path` through a synced temporary sibling and a rename (`mode`: its permissions)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(mode)
        tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(p.parent)
    return p


def sync_tree(root: Path) -> None:
    """fsync every file under `root`, then the folders, so a rename of `root` publishes complete contents."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(path: Path) -> int | None:
    """The pid in a staging name `.NAME.PID-RAND.partial|old`."""
    try:
        return int(path.name.rsplit(".", 2)[-2].split("-")[0])
    except (IndexError, ValueError):
        return None


def recover(final: Path) -> None:
    """Tidy what a killed swap left beside `final`: put the previous folder back when the kill came between
    the two renames, and delete staging folders whose process is gone."""
    debris = [p for p in final.parent.glob(f".{final.name}.*") if p.suffix in (".partial", ".old") and p.is_dir()]
    for p in sorted(debris):
        pid = _owner(p)
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue  # another export into the same place is under way
        if p.suffix == ".old" and not final.exists():
            p.rename(final)
        else:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(final: str | Path) -> Iterator[Path]:
    """Build a folder in a hidden sibling and swap it in at the end; on any error (or a kill) the previous
    folder at `final`, if any, is left exactly as it was. The swap is two renames: the old folder moves
    aside first and is deleted only after the new one is in place (a kill between them is undone by the
    next export's recover())."""
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage = final.with_name(f".{final.name}.{tag}.partial")
    stage.mkdir()
    try:
        yield stage
        sync_tree(stage)
        old = final.with_name(f".{final.name}.{tag}.old")
        if final.exists():
            final.rename(old)
        stage.rename(final)
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def is_occupied(path: str | Path) -> bool:
    """Whether `path` is a file, or a folder with anything in it (an empty folder may be written into)."""
    p = Path(path)
    return p.is_file() or (p.is_dir() and any(p.iterdir()))


def safe_cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: a leading `'` before a formula-starting character."""
    return "'" + text if text.startswith(FORMULA_START) else text


def unsafe_cell(text: str) -> str:
    """The value behind safe_cell(text), for reading our own CSVs back."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_START) else text


def safe_frame(df):
    """A copy of a pandas DataFrame with every text cell passed through safe_cell, for writing as CSV."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    out = df.copy()
    for col in out.columns:
        if is_object_dtype(out[col].dtype) or is_string_dtype(out[col].dtype):
            out[col] = out[col].map(lambda v: safe_cell(v) if isinstance(v, str) else v)
    return out

"""Crash-safe file helpers, content hashing and stage reports shared by every stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(obj: Any) -> str:
    """Stable sha256 of a JSON-serialisable object (sorted keys); used for content cache keys."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def hash_tree(root: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every regular file under `root`, keyed by posix relative path (sorted)."""
    root = Path(root)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(root).as_posix()
            if rel in exclude:
                continue
            out[rel] = sha256_file(p)
    return out


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success replace `final` with it atomically.

    On any exception the temporary folder is removed and `final` is untouched. A reader
    therefore sees the old folder, or the new one, never a mix. (A folder cannot be swapped in
    one syscall on Linux, so the old one is first renamed aside, then removed after the swap.)
    """
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`, moving any existing `final` aside first and deleting it after."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_stale_temps(parent: str | os.PathLike, name: str) -> int:
    """Remove leftovers (`.NAME.tmp-*`, `.old-*`, `.work-*`) of a killed run. Returns how many."""
    parent = Path(parent)
    n = 0
    if parent.is_dir():
        for p in parent.glob(f".{name}.*"):
            if ".tmp-" in p.name or ".old-" in p.name or ".work-" in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                n += 1
    return n


_DISK_FULL_ERRNOS = {28, 27, 122}  # ENOSPC, EFBIG (the file-size limit), EDQUOT
_DISK_FULL_TEXT = (
    "No space left on device",
    "File too large",
    "Disk quota exceeded",
    "os error 28",
    "os error 27",
)


def disk_full(exc: BaseException) -> BaseException | None:
    """The error in `exc`'s chain that says the disk (or the file-size limit, or a quota) is full."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _DISK_FULL_ERRNOS:
            return cur
        if any(t in str(cur) for t in _DISK_FULL_TEXT):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def disk_full_message(exc: BaseException) -> str:
    """One line: what could not be written, the free space there, and what to do."""
    path = getattr(exc, "filename", None)
    where = Path(path).parent if path else Path.cwd()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free / 2**20
    what = f"writing {path}" if path else f"writing under {where}"
    limit = getattr(exc, "errno", None) == 27 or "too large" in str(exc)
    kind = "the file-size limit was reached" if limit else "the disk is full"
    return (
        f"{kind} {what} ({free:,.0f} MB free there); nothing half-written was published: free space "
        "(or raise the limit) and re-run; finished stages are reused"
    )


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path`; a failed write (a full disk) names the file in its error."""
    try:
        path.write_bytes(data)
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def free_bytes(where: str | os.PathLike) -> int:
    """Free bytes on the file system that holds `where` (or its nearest existing parent)."""
    p = Path(where).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(what: str, where: str | os.PathLike, need: int, hint: str) -> None:
    """Refuse, with one line, to start writing about `need` bytes under `where` when the disk there
    clearly has less free. FINESTYLE_DISK_GUARD=0 turns the refusal off."""
    if os.environ.get("FINESTYLE_DISK_GUARD", "1") == "0":
        return
    free = free_bytes(where)
    if need > free:
        from finestyle.core.errors import UserError

        raise UserError(
            f"{what}: needs about {need / 2**20:,.0f} MB under {Path(where).absolute()}, "
            f"{free / 2**20:,.0f} MB free there; {hint}"
        )

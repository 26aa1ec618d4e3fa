"""Model fingerprints for cache keys: a builtin's name and weights' sums, a hub id, or a hash of a
local folder's or file's bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

from finestyle.core.builtins import BUILTINS, SHA256SUMS, is_builtin, weights_dir
from finestyle.core.fs import hash_json, hash_tree, sha256_file
from finestyle.core.loading import SINGLE_FILE_CONFIG_ENV


def model_fingerprint(name: str | None) -> str | None:
    """Identify a model for cache keys: builtin/hub name, or a hash of a local folder's files."""
    if not name:
        return None
    p = Path(name)
    if is_builtin(name) and name in BUILTINS and BUILTINS[name].folder:
        sums = weights_dir() / BUILTINS[name].folder / SHA256SUMS
        return hash_json({"name": name, "sums": sums.read_text() if sums.is_file() else ""})
    if is_builtin(name) or not p.exists():
        return name
    if p.is_file():  # a single-file checkpoint (and the configs it is read with)
        st = p.stat()
        ident = sha256_file(p) if st.st_size < 50_000_000 else f"{st.st_size}:{st.st_mtime_ns}"
        return hash_json({"file": ident, "config": os.environ.get(SINGLE_FILE_CONFIG_ENV)})
    files = (
        hash_tree(p)
        if sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) < 50_000_000
        else {
            f.relative_to(p).as_posix(): f"{f.stat().st_size}:{f.stat().st_mtime_ns}"
            for f in p.rglob("*")
            if f.is_file()
        }
    )
    return hash_json(files)

"""The workspace on disk: stage directories, atomic commits, `_SUCCESS.json`."""
from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUCCESS_FILE = "_SUCCESS.json"
DEFAULT_WORKSPACE = "./workspace"


def resolve_workspace(path: str | Path | None) -> Path:
    """`--workspace`, else `LMFORGE_WORKSPACE`, else `./workspace`; made absolute."""
    chosen = path or os.environ.get("LMFORGE_WORKSPACE") or DEFAULT_WORKSPACE
    return Path(chosen).expanduser().resolve()


def lmforge_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmforge")
    except PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """The commit of the lmforge checkout, when running from one."""
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk before the rename makes it visible."""
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive fcntl lock on `path` (created if needed), released on exit or when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_entries(directory: Path) -> list[dict[str, Any]]:
    """Every file under `directory` as `_SUCCESS.json` lists it: relative path, size and sha256."""
    return [{"path": str(p.relative_to(directory)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(directory.rglob("*")) if p.is_file()]


def output_digest(files: list[dict[str, Any]], ignores: tuple[str, ...] = ()) -> str:
    """sha256 over the (path, bytes, sha256) entries of an output's files, those matching `ignores` left out."""
    kept = [entry for entry in files if not any(fnmatch.fnmatchcase(entry["path"], p) for p in ignores)]
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Workspace:
    """A workspace directory: `stages/<stage>/<fingerprint>/`, `scratch/`, `catalog.duckdb`, `mlflow.db`."""

    root: Path

    @classmethod
    def at(cls, path: str | Path | None) -> "Workspace":
        root = resolve_workspace(path)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    def stage_dir(self, stage: str, fingerprint: str) -> Path:
        return self.root / "stages" / stage / fingerprint

    def scratch_dir(self, stage: str, fingerprint: str) -> Path:
        return self.root / "scratch" / stage / fingerprint

    def lock_path(self, stage: str, fingerprint: str) -> Path:
        return self.root / "locks" / f"{stage}-{fingerprint}.lock"

    def is_done(self, stage: str, fingerprint: str) -> bool:
        """A stage is done if and only if its `_SUCCESS.json` exists."""
        return (self.stage_dir(stage, fingerprint) / SUCCESS_FILE).is_file()

    def read_success(self, stage: str, fingerprint: str) -> dict[str, Any]:
        return json.loads((self.stage_dir(stage, fingerprint) / SUCCESS_FILE).read_text())

    def new_temp_dir(self, stage: str, fingerprint: str) -> Path:
        """A fresh sibling `<fingerprint>.tmp-<random>/` that readers ignore."""
        final = self.stage_dir(stage, fingerprint)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{fingerprint}.tmp-{secrets.token_hex(4)}")
        tmp.mkdir()
        return tmp

    def commit(self, stage: str, fingerprint: str, tmp: Path, record: dict[str, Any],
               digest_ignores: tuple[str, ...] = ()) -> Path:
        """fsync `tmp`, rename it into place, then write `_SUCCESS.json` last; returns the final dir.

        `output_digest` covers every file but those matching `digest_ignores` (see `storage.stage.Stage`).

        An older output of the same fingerprint (`--force`) is first renamed aside to a `*.tmp-old-*`
        name that readers ignore, so no moment exists where `_SUCCESS.json` stands beside missing files.
        """
        final = self.stage_dir(stage, fingerprint)
        files = file_entries(tmp)
        _fsync_tree(tmp)
        old = final.with_name(f"{fingerprint}.tmp-old-{secrets.token_hex(4)}")
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        digest = output_digest(files, digest_ignores)
        success = {**record, "stage": stage, "fingerprint": fingerprint, "files": files, "output_digest": digest,
                   "digest_ignores": list(digest_ignores),
                   "lmforge_version": lmforge_version(), "git_commit": git_commit(), "committed_at": time.time()}
        _write_json_atomic(final / SUCCESS_FILE, success)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def lock(self, stage: str, fingerprint: str) -> AbstractContextManager[None]:
        """Only one process at a time builds a given stage output (others wait, then find it done)."""
        return file_lock(self.lock_path(stage, fingerprint))

    def init_lock(self) -> AbstractContextManager[None]:
        """Held while a process opens (and on first use creates) the workspace's shared stores.

        MLflow's sqlite schema, the catalog tables and Prefect's result block are created on first
        use; two processes starting at once on a fresh workspace must not both create them.
        """
        return file_lock(self.root / "locks" / "workspace-init.lock")

    def clean_temp_dirs(self, stage: str, fingerprint: str) -> int:
        """Remove `*.tmp-*` leftovers of crashed attempts at this stage; returns how many."""
        parent = self.stage_dir(stage, fingerprint).parent
        stale = list(parent.glob(f"{fingerprint}.tmp-*")) if parent.exists() else []
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)

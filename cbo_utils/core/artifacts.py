"""Artifacts: the files that stages hand to each other.

Every artifact is written atomically (temporary file in the same folder, then ``os.replace``) and, where it is a
result, next to a JSON *sidecar* that records how it was made (parameters, inputs and their hashes, package
versions, git revision, seed, timings). Block indices are always 0-based indices of the *original* model.
Nothing here ever writes or reads a pickle; foreign torch files are opened with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike

_VERSIONED_PACKAGES = (
    "cbo_utils", "torch", "transformers", "accelerate", "numpy", "dimod", "dwave-samplers", "dwave-neal",
    "safetensors", "datasets", "lm_eval",
)


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


#: files that mark a folder as one ``cbo`` wrote (a pruned export, a checkpoint-file prune, a compress run)
OWN_FOLDER_MARKERS = ("removed_blocks.json", "compress.json")


def check_output(out: PathLike, overwrite: bool = False) -> Path:
    """The one output policy, applied before any work starts: a missing ``out`` is fine; an existing one is refused
    unless ``overwrite``; ``overwrite`` replaces only what ``cbo`` itself wrote — a folder holding one of
    :data:`OWN_FOLDER_MARKERS`, or a file with its provenance sidecar — and always refuses the current directory,
    its parents, the home directory and anything else. Raises ``FileExistsError`` saying what to do."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return out
    if not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out, or pass --overwrite (overwrite=True) to replace "
                              "an output cbo wrote")
    target, cwd, home = out.resolve(), Path.cwd().resolve(), Path.home().resolve()
    if target == cwd or target in cwd.parents or target == home or target == Path(target.anchor):
        raise FileExistsError(f"--overwrite never replaces {out} (the current directory, one of its parents or the "
                              "home directory); give a new --out")
    own = (target.is_dir() and any((target / m).is_file() for m in OWN_FOLDER_MARKERS)) or \
        (target.is_file() and sidecar_path(target).is_file())
    if not own:
        raise FileExistsError(f"--overwrite replaces only outputs cbo wrote, and {out} is not one (no "
                              f"{' / '.join(OWN_FOLDER_MARKERS)} record); nothing was changed — give a new --out")
    return out


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for one-line error messages."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def check_writable(out: PathLike, kind: str = "file") -> Path:
    """Refuse, before any work, an output that cannot be written: ``kind="file"``: ``out`` must not be a folder;
    ``kind="folder"``: ``out`` must not be a file; and the nearest existing parent must be a writable folder.
    Raises ``OSError`` naming ``out`` and what to do."""
    out = Path(out)
    if kind == "file" and out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; this command writes a file there — give a file name, "
                                f"e.g. {out / 'out.csv'}")
    if kind == "folder" and out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; this command writes a folder — give a folder name")
    parent = out if kind == "folder" and out.is_dir() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"--out {out}: {parent} is a file, so nothing can be created below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {parent} is not writable for you; choose another --out")
    return out


#: the marker inside a temporary folder of :func:`atomic_folder` (a killed run's leftover is recognised by it)
PARTIAL_MARKER = ".cbo-partial"


def clean_partial_folders(out_dir: PathLike) -> list[Path]:
    """Remove the temporary siblings ``.<name>.*`` of ``out_dir`` that :func:`atomic_folder` made and a killed run
    left (only those holding :data:`PARTIAL_MARKER`, so nothing else is touched); returns what was removed."""
    out_dir = Path(out_dir)
    gone = []
    if out_dir.parent.is_dir():
        for p in out_dir.parent.glob(f".{out_dir.name}.*"):
            if p.is_dir() and (p / PARTIAL_MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


@contextlib.contextmanager
def atomic_folder(out_dir: PathLike):
    """Write a folder atomically: yields a temporary sibling folder (mode 0755, not mkdtemp's 0700); on success it
    replaces ``out_dir``, on any error it is deleted — an interrupted write never leaves half a folder behind."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_partial_folders(out_dir)   # what a killed earlier run left
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    os.chmod(tmp, 0o755)
    (tmp / PARTIAL_MARKER).touch()
    try:
        yield tmp
        (tmp / PARTIAL_MARKER).unlink()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def write_json(path: PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON (numpy scalars and arrays allowed)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def sidecar_path(path: PathLike) -> Path:
    """``states.csv`` → ``states.csv.json``: the provenance sidecar of an artifact."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Versions of the packages that shape the numbers (missing ones are skipped)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in (*_VERSIONED_PACKAGES, *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_revision(cwd: PathLike | None = None) -> str | None:
    """The git revision of the working tree (``+dirty`` when it has uncommitted changes), or None."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(kind: str, parameters: Mapping[str, Any] | None = None, inputs: Mapping[str, PathLike] | None = None,
               **extra: Any) -> dict[str, Any]:
    """The standard provenance record: what was made, from what, with which code.

    ``inputs`` maps a role (e.g. ``"hessian"``) to a file; each is recorded with its SHA-256 so a later stage can
    tell whether its input changed.
    """
    rec: dict[str, Any] = {
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "parameters": dict(parameters or {}),
        "inputs": {},
        "versions": package_versions(),
        "git_revision": git_revision(),
        "command": _portable_command(sys.argv),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    for role, p in (inputs or {}).items():
        p = Path(p)
        entry: dict[str, Any] = {"path": portable_path(p)}
        if p.is_file():
            entry["sha256"] = file_sha256(p)
        rec["inputs"][role] = entry
    rec.update(extra)
    return rec


#: the installed package's folder; its parent is the repository in a checkout (see :func:`repo_root`)
PACKAGE_DIR = Path(__file__).resolve().parents[1]
_REPO = PACKAGE_DIR.parent


def repo_root() -> Path | None:
    """The checkout this package runs from (the folder holding ``cbo_utils/`` and ``notebooks/``), or None for an
    installed package. The one definition of the repository root: only the notebook runner, the README generator
    and provenance paths need it; results default to the current directory."""
    return _REPO if (_REPO / "notebooks").is_dir() and (_REPO / "cbo_utils").is_dir() else None


def portable_path(path: PathLike) -> str:
    """How a path is recorded in provenance: relative to the repository when inside it, ``$CBO_CACHE/...`` when in
    the model cache, else as given — so committed records name no machine-specific directory."""
    p = Path(path)
    try:
        return Path(os.path.relpath(p.resolve(), _REPO)).as_posix() if p.resolve().is_relative_to(_REPO) else (
            _cache_relative(p) or str(p))
    except (OSError, ValueError):
        return str(p)


def cache_dir() -> Path:
    """Where converted models and other derived files live (``$CBO_CACHE``, default ``~/.cache/cbo_utils``)."""
    return Path(os.environ.get("CBO_CACHE", Path.home() / ".cache" / "cbo_utils")).expanduser()


def _cache_relative(p: Path) -> str | None:
    cache = cache_dir().resolve()
    return f"$CBO_CACHE/{p.resolve().relative_to(cache).as_posix()}" if p.resolve().is_relative_to(cache) else None


def _portable_command(argv: list[str]) -> str:
    """``sys.argv`` as a command a reader can rerun: ``python -m cbo_utils.x …`` for the package's modules; inside a
    notebook run by :func:`cbo_utils.notebooks.run_notebook` (a kernel whose argv names a temporary connection file),
    the command that ran the notebook (``$CBO_COMMAND``)."""
    if os.environ.get("CBO_COMMAND"):
        return os.environ["CBO_COMMAND"]
    if not argv:
        return ""
    head = Path(argv[0])
    if head.suffix == ".py" and head.resolve().is_relative_to(PACKAGE_DIR):
        parts = head.resolve().relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        first = "python -m " + ".".join(parts[:-1] if parts[-1] == "__main__" else parts)
    else:
        first = portable_path(head) if head.is_absolute() else argv[0]
    return " ".join([first, *(portable_path(a) if Path(a).is_absolute() else a for a in argv[1:])])


def write_sidecar(artifact: PathLike, record: Mapping[str, Any]) -> Path:
    """Write the provenance sidecar ``<artifact>.json`` next to ``artifact``."""
    return write_json(sidecar_path(artifact), dict(record))


def format_blocks(blocks: Iterable[int]) -> str:
    """0-based block indices as the canonical space-separated string: ``[3, 7, 12]`` → ``"3 7 12"``."""
    return " ".join(str(int(b)) for b in sorted(blocks))


def parse_blocks(text: str | Iterable[int]) -> list[int]:
    """Inverse of :func:`format_blocks`; also accepts commas (``"3,7,12"``) and ranges (``"24-29"``)."""
    if not isinstance(text, str):
        return sorted(int(b) for b in text)
    out: list[int] = []
    for tok in text.replace(",", " ").split():
        if "-" in tok[1:]:
            lo, hi = tok.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad block range {tok!r}: write it as LOW-HIGH with LOW <= HIGH, e.g. 24-29")
            out.extend(range(int(lo), int(hi) + 1))
        else:
            if not tok.lstrip("-").isdigit():
                raise ValueError(f"bad block index {tok!r}: block indices are 0-based integers such as '3 7 12'")
            out.append(int(tok))
    return sorted(out)

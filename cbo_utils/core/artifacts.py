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
import stat
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cbo_utils.core import tempfiles

PathLike = str | os.PathLike

_VERSIONED_PACKAGES = (
    "cbo_utils", "torch", "transformers", "accelerate", "numpy", "dimod", "dwave-samplers", "dwave-neal",
    "safetensors", "datasets", "lm_eval",
)


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, never half of one. Inside a
    folder that ``cbo`` owns (one with a :data:`MANIFEST`), an existing file that its record does not list — or that
    changed since — is never replaced (``FileExistsError`` naming it), and what is written is recorded there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = None if path.name == MANIFEST else owning_folder(path)
    if owner is not None and (path.exists() or path.is_symlink()):
        check_replaceable(owner, path)
    fd, tmp = tempfiles.temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)   # the temporary file is 0600; give the file the permissions open() would
        os.replace(tmp, path)
        tempfiles.release(tmp)
    except BaseException:
        tempfiles.discard(tmp)
        raise
    if owner is not None:
        record_files(owner, [path], hashes={path: hashlib.sha256(data).hexdigest()})
    return path


# ------------------------------------------------------------------------------------------------------ ownership
#: the record in a folder cbo wrote: every file it wrote there (size, SHA-256, mtime), the output kind, the command
MANIFEST = ".cbo-manifest.json"
_MANIFEST_KIND = "cbo-manifest"
_MAX_ANCESTORS = 12   # how far up owning_folder looks for a manifest


def _stat_entry(p: Path, sha256: str | None = None) -> dict[str, Any]:
    st = p.lstat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256 or file_sha256(p)}


def _matches(p: Path, entry: Mapping[str, Any]) -> bool:
    """Whether ``p`` is still the file a manifest ``entry`` recorded: a regular file (not a link) of the recorded size
    and content (the SHA-256 is recomputed only when the modification time differs from the recorded one)."""
    try:
        st = p.lstat()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != entry.get("size"):
        return False
    return st.st_mtime_ns == entry.get("mtime_ns") or file_sha256(p) == entry.get("sha256")


def read_manifest(folder: PathLike) -> dict[str, Any] | None:
    """The manifest of ``folder`` (None when it has none, or the file is not a manifest cbo wrote)."""
    p = Path(folder) / MANIFEST
    if not p.is_file() or p.is_symlink():
        return None
    try:
        man = read_json(p)
    except (OSError, ValueError):
        return None
    if not isinstance(man, dict) or man.get("kind") != _MANIFEST_KIND or not isinstance(man.get("files"), dict):
        return None
    return man


def _write_manifest(folder: Path, man: Mapping[str, Any]) -> None:
    atomic_write_text(folder / MANIFEST, json.dumps(man, indent=1, sort_keys=True) + "\n")


def write_manifest(folder: PathLike, output: str, files: Iterable[PathLike] | None = None, **extra: Any) -> Path:
    """Record ``files`` (default: every regular file below ``folder`` — for a folder cbo has just filled itself) as
    written by cbo for an output of kind ``output`` (``"pruned_model"``, ``"compress"``, ``"results"``, …)."""
    folder = Path(folder).absolute()
    if files is None:
        files = [Path(r) / f for r, _, fs in os.walk(folder) for f in fs if f != MANIFEST]
    entries = {}
    for f in files:
        f = Path(f) if Path(f).is_absolute() else folder / f
        if f.is_file() and not f.is_symlink():
            entries[f.relative_to(folder).as_posix()] = _stat_entry(f)
    man = {"kind": _MANIFEST_KIND, "output": output, "command": _portable_command(sys.argv),
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "files": entries, **extra}
    _write_manifest(folder, man)
    return folder / MANIFEST


@contextlib.contextmanager
def _manifest_lock(folder: Path):
    """An advisory lock on ``folder`` while its manifest is read and rewritten (several processes of one run)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # pragma: no cover - no flock here
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record_files(folder: PathLike, paths: Iterable[PathLike], hashes: Mapping[Path, str] | None = None) -> None:
    """Add ``paths`` (files cbo has just written below ``folder``) to the folder's manifest."""
    folder = Path(folder)
    with _manifest_lock(folder):
        man = read_manifest(folder)
        if man is None:
            return
        for p in paths:
            p = Path(p)
            if p.is_file() and not p.is_symlink():
                rel = p.absolute().relative_to(folder.absolute()).as_posix()
                man["files"][rel] = _stat_entry(p, (hashes or {}).get(p))
        _write_manifest(folder, man)


def owning_folder(path: PathLike) -> Path | None:
    """The nearest folder above ``path`` that has a manifest (a folder cbo owns), or None."""
    p = Path(path).absolute().parent
    for _ in range(_MAX_ANCESTORS):
        if tempfiles.owner_of(p):   # inside a temporary folder of ours: its own manifest is written at the end
            return None
        if (p / MANIFEST).is_file():
            return p if read_manifest(p) is not None else None
        if p.parent == p:
            return None
        p = p.parent
    return None


def check_replaceable(folder: PathLike, path: PathLike) -> None:
    """Refuse to replace ``path`` inside the cbo-owned ``folder`` unless its manifest lists it, unchanged."""
    folder, path = Path(folder), Path(path)
    rel = path.absolute().relative_to(folder.absolute()).as_posix()
    entry = (read_manifest(folder) or {}).get("files", {}).get(rel)
    if entry is None:
        raise FileExistsError(f"{path} is not a file cbo wrote (the record {folder / MANIFEST} does not list it); "
                              "cbo does not replace it — move it out of the way, or give another output folder")
    if not _matches(path, entry):
        raise FileExistsError(f"{path} changed since cbo wrote it (its record {folder / MANIFEST} says otherwise); "
                              "cbo does not replace it — move it out of the way, or give another output folder")


def unowned_entries(folder: PathLike, man: Mapping[str, Any] | None = None) -> list[str]:
    """What below ``folder`` its manifest does not account for: files it does not list, listed files that changed,
    links, empty folders it did not create, temporaries of a live process (relative paths, sorted). Temporaries a
    dead cbo process left are removed on the way (:func:`tempfiles.clean_stale`)."""
    folder = Path(folder)
    man = man if man is not None else (read_manifest(folder) or {"files": {}})
    files = man["files"]
    parents = {p for f in files for p in Path(f).parents}
    bad = []
    for root, dirs, names in os.walk(folder):
        r = Path(root)
        for name in sorted({*names, *(d for d in dirs if (r / d).is_symlink())}):
            p = r / name
            rel = p.relative_to(folder).as_posix()
            if rel == MANIFEST:
                continue
            if tempfiles.remove_if_stale(p):   # a dead cbo process's leftover: removed, not in the way
                continue
            if rel not in files or not _matches(p, files[rel]):
                bad.append(rel)
        for d in list(dirs):
            p = r / d
            if p.is_symlink() or not p.exists():   # a link (listed above), or a stale temporary removed above
                dirs.remove(d)
            elif read_manifest(p) is not None:      # an output of its own inside (a run's model/, checkpoint/)
                dirs.remove(d)
                bad += [f"{p.relative_to(folder).as_posix()}/{x}" for x in unowned_entries(p)]
            elif Path(p.relative_to(folder)) not in parents and not any(p.iterdir()):
                bad.append(p.relative_to(folder).as_posix() + "/")
    return sorted(set(bad))


def remove_recorded(folder: PathLike, rels: Iterable[str]) -> list[str]:
    """Delete the files ``rels`` (paths relative to the cbo-owned ``folder``) that its manifest lists and that are
    unchanged since cbo wrote them, and drop them from the record; a file it does not list, or one that changed, is
    kept. Returns the removed paths (sorted). For outputs a later run no longer makes (a figure of a model that is
    gone), never for anything the record does not account for."""
    folder = Path(folder)
    removed = []
    with _manifest_lock(folder):
        man = read_manifest(folder)
        if man is None:
            return []
        for rel in sorted(set(rels)):
            entry = man["files"].get(rel)
            p = folder / rel
            if entry is not None and _matches(p, entry):
                p.unlink()
                del man["files"][rel]
                removed.append(rel)
        if removed:
            _write_manifest(folder, man)
    return removed


def remove_owned(folder: PathLike, strict: bool = True) -> list[str]:
    """Delete exactly the files of ``folder`` that its manifest lists, the folders that become empty, the manifest,
    and ``folder`` itself when it is empty then. ``strict``: only when nothing else is there (else
    ``FileExistsError`` naming it, nothing removed); ``strict=False`` (``make clean-results``): remove the listed
    files that are unchanged and keep everything else. Returns what was kept (relative paths)."""
    folder = Path(folder)
    man = read_manifest(folder)
    if man is None:
        raise FileExistsError(f"{folder} has no record of what cbo wrote ({MANIFEST}); nothing was removed")
    bad = unowned_entries(folder, man)
    if bad and strict:
        raise FileExistsError(_foreign_message(folder, bad))
    nested = {Path(r) for r, _, fs in os.walk(folder) if MANIFEST in fs} - {folder}
    for sub in sorted(nested, key=lambda q: -len(q.parts)):
        if sub.is_dir() and read_manifest(sub) is not None:
            remove_owned(sub, strict)
    for rel in man["files"]:
        if rel not in bad:
            (folder / rel).unlink(missing_ok=True)
    if bad:
        _write_manifest(folder, {**man, "files": {}})   # still a cbo folder; what is left is not recorded as cbo's
        for root, dirs, _ in os.walk(folder, topdown=False):
            for d in dirs:
                p = Path(root) / d
                if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                    p.rmdir()
        return bad
    for root, dirs, _ in os.walk(folder, topdown=False):
        for d in dirs:
            p = Path(root) / d
            if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                p.rmdir()
    (folder / MANIFEST).unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()
    return []


def _foreign_message(folder: Path, bad: list[str]) -> str:
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return (f"--overwrite replaces only what cbo wrote, and {folder} also holds {shown} (not in its record "
            f"{MANIFEST}, or changed since); nothing was changed — move those out, or give another --out")


def _protected(target: Path) -> str | None:
    """Why ``target`` may never be replaced or emptied (the filesystem root, the current folder or one of its
    parents, the home folder or a folder that contains it), or None."""
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == Path(target.anchor):
        return "the filesystem root"
    if target == cwd or target in cwd.parents:
        return "the current directory or one of its parents"
    if target == home or target in home.parents:
        return "the home directory or a folder that contains it"
    return None


def file_is_recorded(path: PathLike) -> bool:
    """Whether ``path`` is exactly the file its provenance sidecar records (name, size and SHA-256)."""
    path, side = Path(path), sidecar_path(path)
    if not path.is_file() or path.is_symlink() or not side.is_file():
        return False
    try:
        art = read_json(side).get("artifact")
    except (OSError, ValueError, AttributeError):
        return False
    return (isinstance(art, dict) and art.get("name") == path.name and art.get("size") == path.stat().st_size
            and art.get("sha256") == file_sha256(path))


def check_output(out: PathLike, overwrite: bool = False) -> Path:
    """The one output policy, applied before any work starts. A missing ``out`` is fine; an existing one is refused
    unless ``overwrite``; ``overwrite`` replaces only what ``cbo`` itself wrote, by its record: a folder whose
    :data:`MANIFEST` lists every file in it, unchanged, or a file whose provenance sidecar records its exact content.
    It never replaces a link, the current directory, its parents, the home directory or a folder that contains it.
    Raises ``FileExistsError`` saying what to do."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return out
    if not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out, or pass --overwrite (overwrite=True) to replace "
                              "an output cbo wrote")
    if out.is_symlink():
        raise FileExistsError(f"--overwrite never replaces {out}: it is a symbolic link; give a new --out")
    why = _protected(out.resolve())
    if why:
        raise FileExistsError(f"--overwrite never replaces {out} ({why}); give a new --out")
    if out.is_dir():
        man = read_manifest(out)
        if man is None:
            raise FileExistsError(f"--overwrite replaces only outputs cbo wrote, and {out} is not one (it has no "
                                  f"{MANIFEST} record of what cbo wrote); nothing was changed — give a new --out")
        bad = unowned_entries(out, man)
        if bad:
            raise FileExistsError(_foreign_message(out, bad))
        return out
    if not file_is_recorded(out):
        raise FileExistsError(f"--overwrite replaces only outputs cbo wrote, and {out} is not one (no sidecar "
                              f"{sidecar_path(out).name} recording its content, or it changed since); nothing was "
                              "changed — give a new --out")
    return out


def claim_folder(out: PathLike, output: str, *, overwrite: bool = False, create: bool = True, **extra: Any) -> Path:
    """Make ``out`` a folder that cbo owns for a run of kind ``output``, before any work — or refuse it.

    A missing or empty folder is created and given a manifest. A folder with a manifest of the same kind is resumed
    (what the run writes there must be listed unchanged in it: :func:`atomic_write_bytes`) or, with ``overwrite``,
    emptied of exactly what its manifest lists and claimed afresh. Anything else — a folder of the user's, one of
    another kind, one holding files cbo did not write (with ``overwrite``) — is refused with ``FileExistsError``
    naming what is in the way; nothing is changed then. ``create=False`` only checks (before validation that may
    still refuse the run: nothing is created). Returns ``out``."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{out} is {'a symbolic link' if out.is_symlink() else 'a file'}, not a folder cbo can "
                              "write a run into; give a new folder")
    if out.is_dir() and any(p.name != MANIFEST for p in out.iterdir()):
        why = _protected(out.resolve())
        if why:
            raise FileExistsError(f"cbo never writes a run into {out} ({why}); give a new folder")
        man = read_manifest(out)
        if man is None:
            shown = ", ".join(sorted(p.name for p in out.iterdir())[:5])
            raise FileExistsError(f"{out} exists and is not a folder cbo wrote (no {MANIFEST} record; it holds "
                                  f"{shown}); nothing was changed — give a new or empty folder")
        if man.get("output") != output:
            raise FileExistsError(f"{out} holds another kind of cbo output ({man.get('output')}, not {output}); "
                                  "nothing was changed — give another folder")
        if not overwrite:
            return out
        check_output(out, overwrite=True)
        if not create:
            return out
        remove_owned(out)
    if not create:
        return out
    out.mkdir(parents=True, exist_ok=True)
    man = read_manifest(out)
    if man is None or man.get("output") != output:
        write_manifest(out, output, files=[], **extra)
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


@contextlib.contextmanager
def atomic_folder(out_dir: PathLike, output: str = "folder", **record: Any):
    """Write a folder atomically: yields a fresh temporary sibling folder (mode 0755, :mod:`tempfiles`); on success
    its :data:`MANIFEST` records every file in it (all were written by this run) and it takes the place of
    ``out_dir`` — an existing ``out_dir`` is replaced only when its own manifest still accounts for everything in it
    (:func:`check_output` with ``overwrite``; the caller checked that before the work). On any error, SIGTERM or
    SIGHUP included, the temporary folder is deleted: an interrupted write never leaves half a folder behind."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tempfiles.clean_stale(out_dir)   # what a killed earlier run left (a dead owner only)
    tmp = tempfiles.temp_dir(out_dir)
    try:
        yield tmp
        write_manifest(tmp, output, **record)
        if out_dir.exists() or out_dir.is_symlink():
            check_output(out_dir, overwrite=True)
            remove_owned(out_dir)
        os.replace(tmp, out_dir)
        tempfiles.release(tmp)
    except BaseException:
        tempfiles.discard(tmp)
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
    """Write the provenance sidecar ``<artifact>.json`` next to ``artifact`` (after the artifact), recording its exact
    content (``artifact``: name, size, SHA-256): the record by which cbo knows the file is its own
    (:func:`file_is_recorded`) and not truncated or edited since (:func:`artifact_intact`)."""
    artifact = Path(artifact)
    rec = dict(record)
    if artifact.is_file():
        rec["artifact"] = {"name": artifact.name, "size": artifact.stat().st_size, "sha256": file_sha256(artifact)}
    return write_json(sidecar_path(artifact), rec)


def artifact_intact(path: PathLike) -> bool:
    """Whether ``path`` is still what its sidecar recorded when it was written (an artifact whose sidecar predates
    content records counts as intact when it exists; a truncated or emptied file is not)."""
    path, side = Path(path), sidecar_path(path)
    if not path.is_file():
        return False
    try:
        art = read_json(side).get("artifact") if side.is_file() else None
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(art, dict):
        return True
    return file_is_recorded(path)


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

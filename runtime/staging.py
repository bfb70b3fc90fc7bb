"""Writing artifacts without destroying anything else: the one place that creates, replaces or removes them.

`staged_artifact(out, sources=..., force=...)` checks OUT (`check_output`), yields a staging directory beside it,
and on success swaps it in: the previous artifact is renamed aside, the stage renamed in, then the old one removed;
if the swap fails the old one is put back, and on any error the stage is removed (a full disk becomes a
`DiskFullError` saying how much was written and how much is free).  What is refused:

* always, even with ``force``: an OUT that is a source (the checkpoint, the SRC artifact), lies inside one or
  contains one; the filesystem root, the home directory and its ancestors, the current directory and its ancestors.
* without ``force``: an existing OUT that is neither empty nor one of our artifacts (a directory whose
  ``manifest.json`` has format "gemma4-deploy-artifact"), and one of our artifacts holding files its manifest does
  not list (someone put them there; they would go with it).  An old artifact that passes is removed whole.

Temporary names carry their owner's host and PID (``.NAME.staging-HOST-PID-RAND``, ``.NAME.old-...``,
``.NAME.tmp-...``).  `clean_stale` removes those of processes that are no longer alive on this host at the next
write, never a live process's; an ``.old-`` directory whose process died before its replacement was moved in is put
back.  Staged directories and files get the permissions the umask gives (mkdtemp's would be 0700).
`check_writable_artifact` is the check for tools that add files to an existing artifact (`graphs.build`).

Deliberately not here: locking (two processes writing one OUT each stage their own copy; the last one wins), and
hashing the old artifact before removing it (a 12B artifact is ~48 GB; the file list is checked, not the bytes).
Torch-free.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from runtime.manifest import FORMAT, MANIFEST_NAME, ArtifactError

__all__ = [
    "DiskFullError",
    "OutputRefused",
    "check_output",
    "check_writable_artifact",
    "clean_stale",
    "error_message",
    "is_artifact",
    "replace_dir",
    "staged_artifact",
    "temp_name",
    "unlisted_files",
]

FORCE_HINT = "pass --force (make FORCE=1)"
# temporary names this module hands out: .NAME.KIND-HOST-PID-RAND
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|old|tmp)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]+$")
# names earlier versions used inside an artifact for their temporary files (no owner in the name)
_LEGACY_TEMP = re.compile(r"^(manifest\.json\.tmp|ort\.staging(/.*)?|engines/cast\.tmp(/.*)?|[^/]+\.plugin\.onnx\.tmp)$")

Log = Callable[[str], object]


class OutputRefused(ArtifactError):
    """OUT cannot be written without destroying something that is not a previous artifact; the message says why."""


class DiskFullError(OSError):
    """The disk filled up while an artifact was written; nothing was left behind.  The message says the sizes."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def temp_name(name: str, kind: str = "staging") -> str:
    """A hidden name for a temporary sibling of ``name`` owned by this process (``kind``: staging, old, tmp)."""
    return f".{name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _move(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def clean_stale(parent: str | Path, name: str | None = None, *, log: Log | None = None) -> list[Path]:
    """Remove the temporary entries in ``parent`` (for ``name`` only, if given) whose owner is dead on this host.

    An ``.old-`` entry whose target no longer exists is moved back instead (its owner died mid-swap).
    Returns what was removed.
    """
    parent = Path(parent)
    log = log or (lambda _m: None)
    try:
        entries = sorted(parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for p in entries:
        m = _TEMP.match(p.name)
        if m is None:
            if name is not None and re.fullmatch(rf"\.{re.escape(name)}\.staging-[A-Za-z0-9_]{{8}}", p.name):
                log(f"note: {p} was left by an earlier version's interrupted write; delete it if no export or "
                    "calibration is running")
            continue
        if (name is not None and m["name"] != name) or m["host"] != _host() or _pid_alive(int(m["pid"])):
            continue
        target = parent / m["name"]
        try:
            if m["kind"] == "old" and not os.path.lexists(target):
                _move(p, target)
                log(f"restored {target} from {p.name} (the process replacing it died before finishing)")
                continue
            _remove(p)
        except OSError as e:
            log(f"warning: could not remove {p} left by a dead process ({e})")
            continue
        removed.append(p)
        log(f"removed {p} (left by process {m['pid']}, no longer running)")
    return removed


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Directories 0777 and files 0666 (0777 if executable) less the umask, like files created by hand."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                executable = os.stat(p).st_mode & 0o111
                os.chmod(p, (0o777 if executable else 0o666) & ~mask)


def _read_ours(path: Path) -> dict | None:
    """The manifest of one of our artifacts at ``path``, or None."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def is_artifact(path: str | Path) -> bool:
    """A directory with a manifest.json of our format (its files are not verified)."""
    return _read_ours(Path(path)) is not None


def _ours_by_name(rel: str) -> bool:
    return rel == MANIFEST_NAME or bool(_LEGACY_TEMP.match(rel)) or any(_TEMP.match(c) for c in rel.split("/"))


def unlisted_files(root: str | Path, manifest: dict | None = None) -> list[str]:
    """Relative paths of files (and links) under the artifact ``root`` that its manifest does not list and that are
    not our temporary files."""
    root = Path(root)
    manifest = manifest if manifest is not None else (_read_ours(root) or {})
    listed = set(manifest.get("files") or {})
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        for d in list(dirnames):
            rel = (rel_dir / d).as_posix()
            if _ours_by_name(rel):
                dirnames.remove(d)
            elif os.path.islink(os.path.join(dirpath, d)):
                out.append(rel)
        for f in filenames:
            rel = (rel_dir / f).as_posix()
            if rel not in listed and not _ours_by_name(rel):
                out.append(rel)
    return sorted(out)


def _protected() -> dict[Path, str]:
    """Directories an artifact never replaces, with what they are."""
    out: dict[Path, str] = {}
    cwd = Path.cwd().resolve()
    for i, p in enumerate([cwd, *cwd.parents]):
        out[p] = "the current directory" if i == 0 else f"an ancestor of the current directory {cwd}"
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):
        home = None
    if home is not None:
        for i, p in enumerate([home, *home.parents]):
            out[p] = "your home directory" if i == 0 else f"an ancestor of your home directory {home}"
    out[Path("/").resolve()] = "the filesystem root"
    return out


def _examples(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _check_existing(out: Path, shown: str, force: bool) -> None:
    """Refuse (unless ``force``) to replace an existing ``out`` that is not one of our artifacts, or that holds files
    its manifest does not list."""
    if force or not os.path.lexists(out):
        return
    if out.is_dir():
        manifest = _read_ours(out)
        if manifest is not None:
            extra = unlisted_files(out, manifest)
            if extra:
                raise OutputRefused(
                    f"OUT {shown} is an artifact but also holds files its manifest.json does not list "
                    f"({_examples(extra)}); replacing the artifact would delete them. Move them out of {shown}, "
                    f"or {FORCE_HINT} to replace it anyway"
                )
            return
        entries = sorted(e.name for e in out.iterdir())
        if not entries:
            return
        raise OutputRefused(
            f"OUT {shown} exists and is not an artifact (no {MANIFEST_NAME} of format {FORMAT!r}; it holds "
            f"{_examples(entries)}); writing the artifact would replace the directory and delete its contents. "
            f"Choose a new or empty directory, or {FORCE_HINT} to replace it"
        )
    raise OutputRefused(f"OUT {shown} exists and is a file, not an artifact directory; choose another path, "
                        f"or {FORCE_HINT} to replace it")


def check_output(out: str | Path, *, sources: Mapping[str, str | Path | None] | None = None,
                 force: bool = False) -> Path:
    """The resolved OUT if an artifact may be written there; else `OutputRefused` naming the path and the reason.

    ``sources``: what the artifact is made from, by what to call it (``{"checkpoint": dir}``); OUT may be none of
    them, inside none and contain none, whatever ``force`` says.
    """
    shown = str(out)
    resolved = Path(out).expanduser().resolve()
    for label, src in (sources or {}).items():
        if src is None:
            continue
        s = Path(src).expanduser().resolve()
        if resolved == s:
            raise OutputRefused(f"OUT {shown} is the {label} ({s}); writing the artifact there would replace it. "
                                "Write the artifact to a new directory")
        if s.is_relative_to(resolved):
            raise OutputRefused(f"OUT {shown} contains the {label} {s}; writing the artifact there would replace "
                                "the directory and delete it. Write the artifact to a new directory")
        if resolved.is_relative_to(s):
            raise OutputRefused(f"OUT {shown} is inside the {label} {s}; write the artifact outside it")
    what = _protected().get(resolved)
    if what is not None:
        raise OutputRefused(f"OUT {shown} is {what} ({resolved}); an artifact replaces its directory whole, so it "
                            f"needs one of its own, e.g. {resolved / 'artifacts' / 'NAME'}")
    _check_existing(resolved, shown, force)
    return resolved


def replace_dir(new: Path, target: Path, *, log: Log | None = None) -> None:
    """Move ``new`` into place as ``target``, which may exist: renamed aside first, put back if the move fails,
    removed after it succeeds.  ``new`` and ``target`` must be in the same directory."""
    old = None
    if os.path.lexists(target):
        old = target.parent / temp_name(target.name, "old")
        _move(target, old)
    try:
        _move(new, target)
    except BaseException:
        if old is not None:
            _move(old, target)
        raise
    if old is not None:
        try:
            _remove(old)
        except OSError as e:
            (log or print)(f"warning: could not remove the replaced {target} moved to {old} ({e}); the next write "
                           "into that directory removes it")


def _is_enospc(e: BaseException | None) -> bool:
    for _ in range(10):
        if e is None:
            return False
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@contextlib.contextmanager
def staged_artifact(out: str | Path, *, sources: Mapping[str, str | Path | None] | None = None, force: bool = False,
                    expected_bytes: int | None = None, log: Log | None = None) -> Iterator[Path]:
    """Yield an empty staging directory beside ``out``; on success it replaces ``out``, on error it is removed.

    ``out`` is checked first (`check_output`); ``expected_bytes`` (if known) goes into the message of a full disk.
    """
    out = check_output(out, sources=sources, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent, out.name, log=log)
    stage = out.parent / temp_name(out.name, "staging")
    os.mkdir(stage)  # 0777 less the umask
    try:
        yield stage
        _apply_umask(stage)
        _check_existing(out, str(out), force)  # again: something may have arrived in OUT meanwhile
        replace_dir(stage, out, log=log)
    except BaseException as e:
        written = _size(stage) if stage.exists() else 0
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        if _is_enospc(e):
            free = shutil.disk_usage(out.parent).free
            need = (f"the artifact needs about {_gib(expected_bytes)}" if expected_bytes
                    else f"the artifact needs more than that")
            raise DiskFullError(
                f"no space left on device while writing {out}: {_gib(written)} were written before {out.parent} "
                f"filled up and {_gib(free)} is free there now; {need}. Free some space or choose an OUT on a "
                "larger disk"
            ) from e
        raise


def check_writable_artifact(root: str | Path, manifest: dict, *, log: Log | None = None) -> None:
    """Before adding files to the existing artifact ``root`` (already read with its manifest): clean its stale
    temporary files and refuse if it holds files its manifest does not list (the rewritten manifest would claim
    them, and a later export would delete them with the artifact)."""
    root = Path(root)
    for d in (root, root / "engines"):
        clean_stale(d, log=log)
    extra = unlisted_files(root, manifest)
    if extra:
        raise OutputRefused(
            f"{root} holds files its manifest.json does not list ({_examples(extra)}); adding engines would record "
            f"them as artifact files, and replacing the artifact later would delete them. Move them out of {root}"
        )


def error_message(e: BaseException) -> str:
    """One line for an expected failure: ``PATH: reason`` for OS errors, the message otherwise."""
    if isinstance(e, OSError) and not isinstance(e, DiskFullError):
        if _is_enospc(e):
            return f"no space left on device writing {e.filename or 'the output'}"
        if e.strerror and e.filename:
            return f"{e.filename}: {e.strerror}"
    return str(e)

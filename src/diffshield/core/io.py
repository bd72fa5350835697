"""Safe output: results appear complete or not at all, and writing never deletes a file diffshield did not write.

Every output folder gets a marker file, :data:`MARKER`, that names the command which wrote it and lists its files.
An existing folder is written to only when it is empty, or, with ``overwrite=True``, when its marker shows it is a
previous output of the same command and it holds nothing beyond the files the marker lists. A result file
(``--json``, ``--grid``, ...) carries diffshield's signature (a ``written_by`` JSON key, a PNG ``Software`` text
chunk); an existing file is replaced only when it carries it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffshield.core.errors import DiffshieldError

#: the file, in every folder diffshield writes, that records which command wrote it and its files
MARKER = ".diffshield-output.json"


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux: ``/proc/self/status``). Elsewhere
    ``os.umask`` can only read it by setting it: under a lock, and set to the restrictive 0o077 meanwhile, so that a
    file another thread creates in that instant is private rather than world-writable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _abs(path: str | Path) -> Path:
    """The absolute, normalised form of ``path`` (``.`` and ``..`` removed; symlinks kept)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _files_under(folder: Path) -> list[str]:
    """Relative POSIX paths of every non-folder entry under ``folder`` (symlinks are entries, never followed)."""
    found = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for d in list(dirs):
            if os.path.islink(os.path.join(root, d)):
                dirs.remove(d)
                found.append((rel / d).as_posix())
        found += [(rel / f).as_posix() for f in files]
    return sorted(f for f in found if f != MARKER)


def read_marker(folder: str | Path) -> dict | None:
    """The marker of a folder diffshield wrote (``{"command", "files", ...}``), or None if it has none."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != "diffshield-output" or not isinstance(
            data.get("files"), list):
        return None
    return data


def write_marker(folder: Path, command: str | None) -> None:
    """Record in ``folder`` that ``diffshield <command>`` (None: the Python API) wrote it, with its file list."""
    from diffshield import __version__

    data = {"format": "diffshield-output", "command": command, "version": __version__,
            "files": _files_under(folder)}
    path = folder / MARKER
    path.write_text(json.dumps(data, indent=2) + "\n")
    os.chmod(path, 0o666 & ~_umask())


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _who(command: str | None) -> str:
    return f"'diffshield {command}'" if command else "diffshield"


def _check_against_inputs(target: Path, inputs: Iterable[str | Path | None], what: str) -> None:
    real = target.resolve()
    for inp in inputs:
        if inp is None or str(inp) == "toy" or str(inp).startswith("toy:"):
            continue
        src = _abs(inp)
        if not src.exists():
            continue
        src = src.resolve()
        if real == src:
            raise DiffshieldError(f"{what} '{target}' is also an input of this command; write the result elsewhere")
        if _within(real, src):
            raise DiffshieldError(f"{what} '{target}' lies inside the input '{inp}'; write the result elsewhere")
        if _within(src, real):
            raise DiffshieldError(f"{what} '{target}' contains the input '{inp}'; write the result elsewhere")


def _check_writable(target: Path, what: str) -> None:
    """Refuse, before any work, an output whose folder cannot be created or written."""
    anc = target.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise DiffshieldError(f"{what} '{target}' cannot be created: '{anc}' is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".diffshield-probe.", dir=anc)
    except OSError as e:
        raise DiffshieldError(f"{what} '{target}' cannot be written: folder '{anc}' is not writable "
                              f"({e.strerror or type(e).__name__}); choose another path") from None
    os.rmdir(probe)


def check_output_dir(target: str | Path, command: str | None = None, overwrite: bool = False,
                     inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse, with a one-line error, an output folder whose writing could lose a file diffshield did not write.

    Accepted: a folder that does not exist, an empty folder, or (only with ``overwrite``) a previous output of the
    same command holding nothing beyond the files its marker lists. Refused: an existing file, any other non-empty
    folder, an output that equals, contains or lies inside one of ``inputs``, a place that cannot be written.

    Args:
        target: the output folder.
        command: the writing command's name (e.g. ``"generate"``); None for the Python API (any marker matches).
        overwrite: replace a previous output of the same command (default False: refuse it).
        inputs: the command's input paths (files or folders; None and ``toy...`` names are skipped).

    A previous output that a killed run of a command left set aside is put back first (:func:`recover_set_aside`).

    Returns:
        ``target`` as an absolute path.
    """
    recover_set_aside(target)
    return _check_output_dir(target, command, overwrite, inputs)


def _check_output_dir(target: str | Path, command: str | None = None, overwrite: bool = False,
                      inputs: Iterable[str | Path | None] = ()) -> Path:
    t = _abs(target)
    flag = "--out"
    if t.exists() and not t.is_dir():
        raise DiffshieldError(f"output '{target}' exists and is not a folder; choose another {flag}")
    _check_against_inputs(t, inputs, "output")
    if t.is_dir() and any(t.iterdir()):
        marker = read_marker(t)
        if marker is None:
            raise DiffshieldError(f"output folder '{target}' is not empty and was not written by {_who(command)}; "
                                  f"choose a new or empty folder (--overwrite replaces only a previous "
                                  f"{_who(command)} output)")
        if command is not None and marker.get("command") != command:
            raise DiffshieldError(f"output folder '{target}' holds the output of {_who(marker.get('command'))}, "
                                  f"not of {_who(command)}; choose another folder (--overwrite replaces only a "
                                  f"previous {_who(command)} output)")
        extra = sorted(set(_files_under(t)) - set(marker["files"]))
        if extra:
            raise DiffshieldError(f"output folder '{target}' holds files {_who(command)} did not write "
                                  f"({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}); move them or "
                                  "choose another folder")
        if not overwrite:
            raise DiffshieldError(f"output folder '{target}' holds a previous {_who(command)} output; pass "
                                  "--overwrite to replace it, or choose another folder")
    _check_writable(t, "output folder")
    return t


#: the JSON key (and, in PNGs, the text chunk ``Software``) by which a result file says diffshield wrote it
WRITTEN_BY = "written_by"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_MAX_SNIFF = 256 * 2**20  # bytes: a larger file is not read to look for the signature (and is never replaced)


def signature() -> str:
    """What diffshield writes into its result files: ``"diffshield <version>"``."""
    from diffshield import __version__

    return f"diffshield {__version__}"


def written_by_diffshield(path: str | Path) -> bool:
    """Whether the file at ``path`` is a diffshield result: a PNG whose ``Software`` text chunk names diffshield,
    or a JSON object whose ``written_by`` names diffshield or whose ``format`` is a diffshield format (TERD
    calibrations, run records). Anything else, unreadable or over 256 MiB, is not."""
    p = Path(path)
    try:
        if p.is_symlink() or not p.is_file() or p.stat().st_size > _MAX_SNIFF:
            return False
        data = p.read_bytes()
        if data.startswith(_PNG_MAGIC):
            import io

            with Image.open(io.BytesIO(data)) as im:
                return str(im.info.get("Software", "")).startswith("diffshield")
        obj = json.loads(data)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False
    return isinstance(obj, dict) and (str(obj.get(WRITTEN_BY, "")).startswith("diffshield")
                                      or str(obj.get("format", "")).startswith("diffshield-"))


def check_replaceable(path: str | Path, flag: str) -> None:
    """Refuse, in one line, to replace an existing file that diffshield did not write (or a symbolic link)."""
    p = _abs(path)
    if p.is_symlink():
        raise DiffshieldError(f"{flag} '{path}' is a symbolic link; name the file itself or another file")
    if p.exists() and not written_by_diffshield(p):
        raise DiffshieldError(f"{flag} '{path}' exists and was not written by diffshield; choose another file name "
                              "(diffshield replaces only its own earlier result files)")


def check_output_file(path: str | Path | None, flag: str, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse, before any work, an output file (``--json``, ``--grid``, ...) that is a folder, one of ``inputs``,
    an existing file diffshield did not write (see :func:`written_by_diffshield`), or cannot be written. An earlier
    diffshield result of that name is replaced when the command finishes."""
    if path is None:
        return
    p = _abs(path)
    if p.is_dir():
        raise DiffshieldError(f"{flag} '{path}' is a folder; give a file name")
    _check_against_inputs(p, inputs, flag)
    check_replaceable(path, flag)
    if flag == "--json" and p.is_file():  # a JSON report over an earlier result image (--json grid.png): a slip
        with open(p, "rb") as f:
            if f.read(len(_PNG_MAGIC)) == _PNG_MAGIC:
                raise DiffshieldError(f"--json '{path}' is an image diffshield wrote; a JSON report would replace "
                                      "it: give a .json file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise DiffshieldError(f"{flag} '{path}' exists and is not writable; choose another file")
    _check_writable(p, flag)


def _move_into(src: Path, dst: Path) -> None:
    for entry in src.iterdir():
        os.replace(entry, dst / entry.name)
    src.rmdir()


def _remove_listed(folder: Path, marker: dict) -> None:
    """Delete the files a marker lists (and the folders they leave empty), nothing else."""
    for rel in marker["files"]:
        p = folder / rel
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():  # pragma: no cover - a listed symlink to a folder that became a folder
            continue
    for root, _dirs, _files in os.walk(folder, topdown=False):
        if Path(root) != folder:
            with contextlib.suppress(OSError):
                os.rmdir(root)
    (folder / MARKER).unlink(missing_ok=True)


def clear_previous_output(target: str | Path, command: str | None = None, overwrite: bool = False) -> Path:
    """Make ``target`` an empty folder to write into directly: refuse as :func:`check_output_dir` does, and with
    ``overwrite`` delete only the files a previous output's marker lists. For commands that write in place."""
    t = check_output_dir(target, command, overwrite)
    if t.is_dir():
        marker = read_marker(t)
        if marker is not None:
            _remove_listed(t, marker)
    t.mkdir(parents=True, exist_ok=True)
    return t


def follow_umask(folder: Path) -> None:
    """Give every file under ``folder`` the mode the user's umask sets (0o644 under 0o022): safetensors (0.8) and
    temporary files are created private (0o600), which left saved models unreadable to the user's group."""
    mode = 0o666 & ~_umask()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p) and os.stat(p).st_mode & 0o777 != mode:
                os.chmod(p, mode)


#: the random part of a temporary name (:func:`tempfile.mkdtemp`, :func:`tempfile.mkstemp`)
_TEMP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def _try_lock(path: Path, blocking: bool = False) -> int | None:
    """An open descriptor of ``path`` (a folder or a file) holding an exclusive ``flock`` on it, or None when the lock
    is taken by a live process, or the system or file system has no such locks. The lock goes with the process: a
    killed process no longer holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _is_temp_name(name: str, base: str, suffix: str) -> bool:
    """Whether ``name`` is ``.<base>.<8 random characters><suffix>``, a temporary name diffshield makes for
    ``base``."""
    head = f".{base}."
    if not (name.startswith(head) and name.endswith(suffix)):
        return False
    middle = name[len(head):len(name) - len(suffix)]
    return len(middle) == 8 and set(middle) <= _TEMP_CHARS


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Delete the temporary siblings (``.NAME.xxxxxxxx.tmp`` folders, ``.NAME.xxxxxxxx.tmp`` files) that killed
    diffshield processes (SIGKILL, a lost machine) left next to ``target``; one that a running process still writes
    (it holds a lock on it) is kept. Returns what was removed."""
    t = _abs(target)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(t.parent))
    except OSError:
        return removed
    for e in entries:
        if not _is_temp_name(e.name, t.name, ".tmp") or e.is_symlink():
            continue
        path = Path(e.path)
        fd = _try_lock(path)
        if fd is None:
            continue  # a live process writes it (or locks are unavailable here: keep it)
        try:
            if e.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            _unlock(fd)
    return removed


def recover_set_aside(target: str | Path) -> None:
    """Undo what a killed process left of replacing ``target``: a previous output set aside as ``.NAME.xxxxxxxx.old``
    (while a training run works, or for an instant while a finished folder takes its place) that no live process
    holds. When ``target`` is missing the previous output is put back; when the new output is in place, the files
    the old one's marker lists are deleted (what its replacement would have deleted). Anything else stays."""
    t = _abs(target)
    try:
        entries = [e for e in os.scandir(t.parent) if _is_temp_name(e.name, t.name, ".old") and e.is_dir()
                   and not e.is_symlink()]
    except OSError:
        return
    if not entries:
        return
    with _parent_locked(t):  # not in the instant a finishing atomic_dir swaps the folders
        _recover(t, entries)


def _recover(t: Path, entries: list[os.DirEntry]) -> None:
    for e in entries:
        path = Path(e.path)
        fd = _try_lock(path)
        if fd is None:
            continue
        try:
            marker = read_marker(path)
            if marker is None:
                continue
            if not t.exists():
                path.rename(t)
            elif (t / MARKER).is_file():
                _remove_listed(path, marker)
                with contextlib.suppress(OSError):
                    path.rmdir()
        finally:
            _unlock(fd)


#: the temporary folders this process is writing (and holds a lock on): an output nested in one of them (the demo's
#: steps) is written by this process alone, and locking its parent again would wait for this process itself
_WRITING: set[Path] = set()


@contextlib.contextmanager
def _parent_locked(target: Path) -> Iterator[None]:
    """Hold a lock on ``target``'s parent folder, so that two processes finishing the same output check and move it
    one after the other (the second then sees the first's result); without locks on this system, no lock."""
    parent = _abs(target).parent
    fd = None if parent in _WRITING else _try_lock(parent, blocking=True)
    try:
        yield
    finally:
        _unlock(fd)


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False, command: str | None = None,
               inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it becomes ``target``, on error it is removed.

    ``target`` is checked with :func:`check_output_dir` before and again after the work: a missing or empty folder
    is written; a previous output of the same command is replaced only with ``overwrite``; anything else is
    refused and left as it was. The result gets a :data:`MARKER` file listing what was written.

    Args:
        target: the folder to write.
        overwrite: replace a previous output of ``command`` (default False: refuse it).
        command: the CLI command writing it (default None: the Python API).
        inputs: input paths the output must not equal, contain or lie inside.
    """
    target = check_output_dir(target, command, overwrite, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as e:
        raise DiffshieldError(f"cannot write next to '{target}' ({e.strerror or type(e).__name__}); choose "
                              "another output folder") from None
    lock = _try_lock(tmp)  # tells remove_stale_temps of another process that this folder is being written
    _WRITING.add(tmp)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should be an ordinary folder
        yield tmp
        follow_umask(tmp)
        write_marker(tmp, command)
        with _parent_locked(target):
            _check_output_dir(target, command, overwrite)  # nothing appeared in the meantime
            _move_result(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _WRITING.discard(tmp)
        _unlock(lock)


def _move_result(tmp: Path, target: Path) -> None:
    """Put the finished folder ``tmp`` in the place of ``target`` (missing, empty, or a previous output that
    :func:`check_output_dir` accepted)."""
    if not target.exists():
        tmp.rename(target)
    elif not any(target.iterdir()):
        _move_into(tmp, target)
    elif _within(_abs(os.getcwd()), target):  # never move the current folder away: replace its files in place
        _remove_listed(target, read_marker(target))
        _move_into(tmp, target)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.rmdir(old)
        target.rename(old)
        tmp.rename(target)
        _remove_listed(old, read_marker(old))
        with contextlib.suppress(OSError):
            old.rmdir()


@contextlib.contextmanager
def output_in_place(target: str | Path, command: str, overwrite: bool = False,
                    inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """For library functions that write a folder themselves (training runs): check ``target`` as
    :func:`check_output_dir` does, set a previous output of ``command`` aside while the work runs (restored if it
    fails, deleted when it succeeds), yield ``target``, then mark the result as ``command``'s output. A previous
    output that a killed run left set aside is put back first (:func:`recover_set_aside`)."""
    t = check_output_dir(target, command, overwrite, inputs)
    aside = lock = None
    if t.is_dir() and any(t.iterdir()):
        if _within(_abs(os.getcwd()), t):
            raise DiffshieldError(f"'{target}' is the current folder (or holds it); run the command from elsewhere "
                                  "to replace it")
        aside = Path(tempfile.mkdtemp(prefix=f".{t.name}.", suffix=".old", dir=t.parent))
        os.rmdir(aside)
        t.rename(aside)
        lock = _try_lock(aside)  # this run's: recover_set_aside of another process leaves it alone
    try:
        yield t
    except BaseException:
        if aside is not None and not t.exists():
            aside.rename(t)
        raise
    finally:
        _unlock(lock)
    if aside is not None:
        _remove_listed(aside, read_marker(aside))
        with contextlib.suppress(OSError):
            aside.rmdir()
    if t.is_dir():
        follow_umask(t)
        write_marker(t, command)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file (``.NAME.xxxxxxxx.tmp``, locked while it is written) and a
    rename, with the user's umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with contextlib.suppress(ImportError, OSError):  # marks it as being written (see remove_stale_temps)
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result should be an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def canonical_safetensors(data: bytes) -> bytes:
    """The bytes of a safetensors file with its ``__metadata__`` in sorted key order. The safetensors library writes
    metadata in the order of a randomly seeded hash map, so the same tensors and metadata saved twice (even in one
    process) gave different files; in this form they give the same bytes. Loading reads the same tensors and
    metadata."""
    if len(data) < 8:
        raise DiffshieldError("not a safetensors file: shorter than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        raise DiffshieldError("not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise DiffshieldError("not a safetensors file: its header is not a JSON object")
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if isinstance(meta, dict) else {}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the library's alignment of the tensor data
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """``safetensors.torch.save(tensors, metadata=metadata)`` in :func:`canonical_safetensors` form: the same tensors
    and metadata always give the same bytes."""
    from safetensors.torch import save

    return canonical_safetensors(save(tensors, metadata=metadata))


def atomic_write_json(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented JSON to ``path`` (atomically)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_save_image(image: Image.Image, path: str | Path, signed: bool = False) -> Path:
    """Save a PIL image as PNG to ``path`` atomically, with the user's umask; ``signed`` adds the ``Software``
    text chunk (:func:`signature`) that lets a later run replace it."""
    import io

    from PIL.PngImagePlugin import PngInfo

    buf = io.BytesIO()
    info = None
    if signed:
        info = PngInfo()
        info.add_text("Software", signature())
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def write_result_json(path: str | Path, obj: dict, flag: str = "--json") -> None:
    """Write a command's result file (``--json``): ``obj`` plus ``written_by`` (:func:`signature`), atomically;
    an existing file is replaced only if diffshield wrote it (checked again now, not only before the work)."""
    check_replaceable(path, flag)
    remove_stale_temps(path)
    atomic_write_json(path, {**obj, WRITTEN_BY: signature()})


def save_result_image(image: Image.Image, path: str | Path, flag: str) -> Path:
    """Write a command's result PNG (``--grid``, ``--panel``, ``protect --out``), signed, atomically; an existing
    file is replaced only if diffshield wrote it (checked again now)."""
    check_replaceable(path, flag)
    remove_stale_temps(path)
    return atomic_save_image(image, path, signed=True)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float tensor in [0, 1] -> PIL RGB image; (1, H, W) -> greyscale ("L")."""
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def display_upscale(size: int, target: int = 96) -> int:
    """The integer (nearest-neighbour) upscale that shows an image of ``size`` px at ``target`` px or more: 3 for
    the toy world's 32 px images, 1 for images already ``target`` px or larger."""
    return max(1, -(-int(target) // max(1, int(size))))


def _font(size: int = 13):
    """A scalable font for labels (Pillow's bundled one; its small bitmap font on a Pillow without FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # pragma: no cover - Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    box = font.getbbox(text)
    return int(box[2] - box[0])


def _fit_lines(font, text: str, width: int, max_lines: int = 3) -> list[str]:
    """``text`` wrapped into at most ``max_lines`` lines of ``width`` px (the last one cut with an ellipsis)."""
    words, lines, line = str(text).split(), [], ""
    for w in words:
        trial = f"{line} {w}".strip()
        if _text_width(font, trial) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = w
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1] + " ..."
    out = []
    for ln in lines:  # a single word wider than the column: cut it
        if _text_width(font, ln) > width:
            while len(ln) > 1 and _text_width(font, ln + "...") > width:
                ln = ln[:-1]
            ln += "..."
        out.append(ln)
    return out


def label_grid(grid: Image.Image, rows: int, cols: int, row_labels: list[str] | None = None,
               col_labels: list[str] | None = None, title: str | None = None, pad: int = 1,
               font_size: int = 13) -> Image.Image:
    """``grid`` (as :func:`make_grid` lays it out: ``rows`` x ``cols`` equal cells separated by ``pad`` px) with a
    title line, a label above each column and a label left of each row, on a white margin (black text).

    Args:
        grid: the tiled image. rows, cols: its layout.
        row_labels: one label per row (fewer: the rest unlabelled; default None: no row labels).
        col_labels: one label per column (default None: none). title: a line above everything (default None).
        pad: the grid's padding between cells (default 1). font_size: in px (default 13).
    """
    from PIL import ImageDraw

    font = _font(font_size)
    line_h = font_size + 4
    cell_w = (grid.width - pad) / max(1, cols)
    cell_h = (grid.height - pad) / max(1, rows)
    row_labels = [str(t) for t in row_labels or []]
    col_labels = [str(t) for t in col_labels or []]
    left = 0
    if row_labels:
        widest = max(_text_width(font, w) for t in row_labels for w in (t.split() or [""]))
        left = int(min(max(widest, min(max(_text_width(font, t) for t in row_labels), 160), 60), 240)) + 12
    col_lines = [_fit_lines(font, t, int(cell_w) - 4, 3) for t in col_labels]
    top = (max(map(len, col_lines)) * line_h + 4) if col_lines else 0
    title_lines = _fit_lines(font, title, left + grid.width - 8, 3) if title else []
    head = len(title_lines) * line_h + (4 if title_lines else 0)
    canvas = Image.new("RGB", (left + grid.width, head + top + grid.height), (255, 255, 255))
    canvas.paste(grid, (left, head + top))
    draw = ImageDraw.Draw(canvas)
    for k, ln in enumerate(title_lines):
        draw.text((4, 2 + k * line_h), ln, fill=(0, 0, 0), font=font)
    for c, lines in enumerate(col_lines[:cols]):
        x0 = left + pad + c * cell_w
        for k, ln in enumerate(lines):
            draw.text((x0 + (cell_w - pad - _text_width(font, ln)) / 2, head + 2 + k * line_h), ln, fill=(0, 0, 0),
                      font=font)
    for r, text in enumerate(row_labels[:rows]):
        max_lines = max(1, int(cell_h // line_h))
        lines = _fit_lines(font, text, left - 10, max_lines)
        y0 = head + top + pad + r * cell_h + (cell_h - pad - len(lines) * line_h) / 2
        for k, ln in enumerate(lines):
            draw.text((4, y0 + k * line_h), ln, fill=(0, 0, 0), font=font)
    return canvas


def make_grid(images: torch.Tensor, nrow: int = 8, upscale: int = 1, pad: int = 1,
              row_labels: list[str] | None = None, col_labels: list[str] | None = None,
              title: str | None = None) -> Image.Image:
    """Tile (N, 3, H, W) (or greyscale (N, 1, H, W)) images in [0, 1] into an RGB grid image, ``nrow`` per row, each
    upscaled (nearest); with ``row_labels``, ``col_labels`` or ``title``, labelled as :func:`label_grid` does."""
    n, _, h, w = images.shape
    nrow = max(1, min(nrow, n))
    rows = (n + nrow - 1) // nrow
    canvas = Image.new("RGB", (nrow * (w * upscale + pad) + pad, rows * (h * upscale + pad) + pad), (255, 255, 255))
    for i in range(n):
        im = to_pil(images[i]).convert("RGB")
        if upscale != 1:
            im = im.resize((w * upscale, h * upscale), Image.NEAREST)
        r, c = divmod(i, nrow)
        canvas.paste(im, (pad + c * (w * upscale + pad), pad + r * (h * upscale + pad)))
    if row_labels or col_labels or title:
        return label_grid(canvas, rows, nrow, row_labels, col_labels, title, pad=pad)
    return canvas

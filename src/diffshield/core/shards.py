"""Sharded, resumable image jobs over a prompt set: every image written once, named by (prompt index, seed).

A *run folder* holds one job list, split between processes by prompt index:

- ``run.json``: the run's settings and prompt rows (what the images depend on); a rerun with the same settings
  resumes the folder, other settings are refused (or, with ``overwrite``, replace it);
- ``images/p000012_s42.png`` (``images/<role>/...`` when several models are compared): image of prompt index 12,
  seed 42, written atomically the moment its batch is decoded;
- ``scores/shard-00001-of-00002.jsonl``: one line per image the process wrote or scored, with the image's SHA-256
  and its raw scores (detections), appended and flushed per batch;
- after :func:`merge_run`: ``manifest.json`` (one row per image, scores included), ``metrics.json`` and the
  ``.diffshield-output.json`` marker listing every file.

An image counts as done when its PNG exists, decodes to the expected size, and a score line carries its SHA-256. A
rerun scans the folder, splits only the prompts with unfinished images between its processes, regenerates missing or
corrupt images and scores images that lack a score line. Images are written by a background thread while the next
batch is generated; a process killed mid-run loses only its batches in flight (the one being generated, the one
being written and at most :data:`WRITE_QUEUE` waiting).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffshield.core.errors import DiffshieldError
from diffshield.core.io import (
    MARKER,
    _check_against_inputs,
    _files_under,
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    read_marker,
    to_pil,
    write_marker,
)

RUN_FILE = "run.json"
IMAGES_DIR = "images"
SCORES_DIR = "scores"
#: files a run folder may hold besides images and score files
#: the files of the models a run depends on, as the run found them (:func:`model_files_record`)
MODELS_FILE = "models.json"
RUN_OUTPUTS = (RUN_FILE, MODELS_FILE, "manifest.json", "metrics.json", "grid.png")
_IMAGE_RE = re.compile(r"^images/(?:[a-z]+/)?p\d{6,}_s\d+\.png$")
_TEMP_RE = re.compile(r"^images/(?:[a-z]+/)?\.p\d{6,}_s\d+\.png\.[^/]+$")  # atomic-write leftovers of a killed process
#: what only an audit's run folder holds (diffshield.redteam.sharded): one unit per attack, the merged audit, and
#: the units' atomic-write leftovers; in another command's run folder such files are the user's
AUDIT_COMMAND = "audit"
_AUDIT_RE = re.compile(r"^(?:units/[a-z0-9-]+\.pt|audit\.json)$")
_AUDIT_TEMP_RE = re.compile(r"^units/\.[a-z0-9-]+\.pt\.[^/]+$")
_SCORES_RE = re.compile(r"^scores/shard-\d{5}-of-\d{5}\.jsonl$")

#: a function that scores a batch: (jobs, their PNG paths, images (N, 3, H, W) in [0, 1] read back from the PNGs)
#: -> one JSON-able dict per image
Scorer = Callable[[list["ImageJob"], list[Path], torch.Tensor], list[dict]]


@dataclass(frozen=True)
class ImageJob:
    """One image of a run: prompt ``prompt_index`` of the set, drawn by ``role``'s model from ``seed``."""

    prompt_index: int
    seed: int
    guidance: float
    role: str = ""

    @property
    def file(self) -> str:
        """The image's path relative to the run folder."""
        name = f"p{self.prompt_index:06d}_s{self.seed}.png"
        return f"{IMAGES_DIR}/{self.role}/{name}" if self.role else f"{IMAGES_DIR}/{name}"


def plan_jobs(rows: list, n: int, seed: int, guidance: float, roles: Iterable[str] = ("",)) -> list[ImageJob]:
    """The images of a prompt set: ``n`` per row (seeds ``row.seed + k``, or ``seed + k`` for rows without one), at
    the row's guidance or ``guidance``, once per role; ordered by prompt index, role, seed."""
    jobs = []
    for i, r in enumerate(rows):
        base = seed if r.seed is None else r.seed
        g = guidance if r.guidance is None else r.guidance
        for role in roles:
            jobs += [ImageJob(i, base + k, float(g), role) for k in range(n)]
    return jobs


def png_bytes(image: torch.Tensor) -> bytes:
    """The PNG encoding of a (3, H, W) image in [0, 1] (8 bits per channel, as every diffshield image)."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def read_png(path: Path) -> torch.Tensor:
    """A PNG as a (3, H, W) float tensor in [0, 1]."""
    import numpy as np

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def verify_png(path: Path, size: int | None = None, decode: bool = True) -> bool:
    """True when ``path`` is a non-empty image file that decodes completely (and is ``size`` x ``size`` pixels);
    ``decode=False`` reads only its header (for bytes already known whole)."""
    try:
        if path.stat().st_size == 0:
            return False
        with Image.open(path) as im:
            if decode:
                im.load()
            return size is None or im.size == (size, size)
    except Exception:
        return False


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------- run folder


def _spec_difference(old: dict, new: dict) -> str:
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            if k == "prompts":
                return _prompts_difference(old.get(k), new.get(k))
            return f"{k}: {old.get(k)!r} here, {new.get(k)!r} now"
    return ""


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _prompts_difference(old: object, new: object) -> str:
    """Where two prompt sets (``run.json``'s rows) first differ, in a few words: with thousands of rows, "the prompt
    set differs" leaves the user to search the file."""
    if not isinstance(old, list) or not isinstance(new, list):
        return "the prompt set differs"
    count = f"{len(old)} prompts here, {len(new)} now; " if len(old) != len(new) else ""
    i = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), None)
    if i is None:  # one set extends the other
        return f"the prompt set differs ({count}the first {min(len(old), len(new))} are the same)"
    a, b = old[i], new[i]
    if isinstance(a, dict) and isinstance(b, dict):
        field = next((f for f in [*a, *(f for f in b if f not in a)] if a.get(f, a) != b.get(f, a)), None)
        shown = lambda row: _short(row[field]) if field in row else "absent"  # noqa: E731
        what = f"prompt {i}'s {field}: {shown(a)} here, {shown(b)} now" if field is not None else f"prompt {i}"
    else:
        what = f"prompt {i}: {_short(a)} here, {_short(b)} now"
    return f"the prompt set differs ({count}first at {what})"


def _run_files(folder: Path, command: str) -> tuple[list[str], list[str], list[str]]:
    """(files a run of ``command`` writes, leftover temporary files of killed processes, anything else) under
    ``folder``."""
    ours, temps, other = [], [], []
    audit = command == AUDIT_COMMAND
    for rel in _files_under(folder):
        if rel in RUN_OUTPUTS or _IMAGE_RE.match(rel) or _SCORES_RE.match(rel) or (audit and _AUDIT_RE.match(rel)):
            ours.append(rel)
        elif _TEMP_RE.match(rel) or (audit and _AUDIT_TEMP_RE.match(rel)):
            temps.append(rel)
        else:
            other.append(rel)
    return ours, temps, other


def _remove_run(folder: Path, command: str) -> None:
    """Delete a previous run's own files (never anything else) and the folders they leave empty."""
    ours, temps, _ = _run_files(folder, command)
    for rel in ours + temps:
        (folder / rel).unlink(missing_ok=True)
    for sub in (f"{IMAGES_DIR}/erased", f"{IMAGES_DIR}/original", IMAGES_DIR, SCORES_DIR, "units"):
        with contextlib.suppress(OSError):
            (folder / sub).rmdir()
    (folder / MARKER).unlink(missing_ok=True)


_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json", ".txt", ".model")


def _model_path(spec: str | Path) -> Path:
    p = Path(str(spec)).expanduser()
    if p.is_file():
        return p
    from diffshield.core.loading import resolve_model_path

    return resolve_model_path(spec)


def _model_files(path: Path) -> dict[str, Path]:
    """The weight, config and tokenizer files of a model folder (or the file itself), by relative path."""
    from diffshield.core.io import MARKER

    if path.is_file():
        return {path.name: path}
    return {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*"))
            if p.is_file() and p.suffix in _MODEL_FILE_SUFFIXES and p.name != MARKER
            and not any(part.startswith(".") for part in p.relative_to(path).parts)}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def model_files_record(models: dict[str, str | Path | None]) -> dict:
    """``{role: {"path", "files": {relative path: [size, mtime_ns, sha256]}}}`` of the weight, config and tokenizer
    files of each model (a folder, a ``toy:`` name or a file; None is skipped): what a resumed run checks, so that
    its images and results never mix two versions of a model saved at the same path. Hashing reads every file once
    (about 3 s for an SD-1.4 folder)."""
    out = {}
    for role, spec in models.items():
        if spec is not None:
            stats = {rel: (f.stat(), f) for rel, f in _model_files(_model_path(spec)).items()}
            out[role] = {"path": str(spec), "files": {
                rel: [st.st_size, st.st_mtime_ns, _sha256_file(f)] for rel, (st, f) in stats.items()}}
    return out


def model_files_change(recorded: dict, models: dict[str, str | Path | None]) -> str:
    """How the models' files differ from ``recorded`` (:func:`model_files_record`), or "" when they are the same.
    A file whose size and modification time are unchanged is taken as unchanged without reading it."""
    for role, spec in models.items():
        if spec is None or role not in recorded:
            continue
        old = recorded[role].get("files", {})
        now = _model_files(_model_path(spec))
        for rel in sorted(set(old) | set(now)):
            if rel not in now:
                return f"{spec}: {rel} is gone"
            if rel not in old:
                return f"{spec}: {rel} is new"
            size, mtime, digest = old[rel]
            st = now[rel].stat()
            if (st.st_size, st.st_mtime_ns) != (size, mtime) and _sha256_file(now[rel]) != digest:
                return f"{spec}: {rel} has changed"
    return ""


def check_run_dir(folder: str | Path, command: str, spec: dict, overwrite: bool = False,
                  inputs: Iterable[str | Path | None] = (), models: dict[str, str | Path | None] | None = None
                  ) -> str:
    """Decide, without writing, what a run in ``folder`` would do: ``"new"`` (missing or empty folder), ``"resume"``
    (an unfinished or finished run of ``command`` with the same ``spec``, and with ``models``' files as the run
    recorded them in ``models.json``) or ``"replace"`` (a previous output of ``command`` with other settings or
    other model files, only with ``overwrite``). Anything else is refused with a one-line error: a folder another
    command wrote, a folder holding files the run did not write, other settings or a model saved anew at the same
    path without ``overwrite``."""
    t = Path(os.path.abspath(os.path.expanduser(str(folder))))
    marker = read_marker(t) if t.is_dir() else None
    if marker is None or not (t / RUN_FILE).is_file():
        check_output_dir(t, command, overwrite, inputs)  # a missing/empty folder, or a plain previous output
        return "replace" if t.is_dir() and any(t.iterdir()) else "new"
    if marker.get("command") != command:
        check_output_dir(t, command, overwrite, inputs)  # refuses: the output of another command
    _check_against_inputs(t, inputs, "output")
    _, _, other = _run_files(t, command)
    if other:
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        raise DiffshieldError(f"run folder '{folder}' holds files 'diffshield {command}' did not write "
                              f"({', '.join(other[:3])}{more}); move them or choose another folder")
    try:
        old = json.loads((t / RUN_FILE).read_text())
    except (OSError, ValueError):
        old = {}
    diff = _spec_difference(old, spec)
    if not diff and models and (t / MODELS_FILE).is_file():
        try:
            recorded = json.loads((t / MODELS_FILE).read_text())
        except (OSError, ValueError):
            recorded = {}
        change = model_files_change(recorded, models)
        if change:
            if not overwrite:
                raise DiffshieldError(f"run folder '{folder}' was started with other model files ({change}); its "
                                      "results would mix two models: pass --overwrite to start it again, or choose "
                                      "another folder")
            return "replace"
    if not diff:
        return "resume"
    if not overwrite:
        raise DiffshieldError(f"run folder '{folder}' holds a 'diffshield {command}' run with other settings "
                              f"({diff}); rerun with its settings to resume it, pass --overwrite to replace it, or "
                              "choose another folder")
    return "replace"


def prepare_run_dir(folder: str | Path, command: str, spec: dict, overwrite: bool = False,
                    inputs: Iterable[str | Path | None] = (), models: dict[str, str | Path | None] | None = None
                    ) -> str:
    """Check ``folder`` as :func:`check_run_dir` does, then make it ready: create it (or clear a replaced previous
    output, deleting only that output's files) and write ``run.json``, ``models.json`` (the files of ``models``, see
    :func:`model_files_record`) and an in-progress marker; on resume, delete the temporary files of killed
    processes. Call it in one process only. Returns what :func:`check_run_dir` says."""
    t = Path(os.path.abspath(os.path.expanduser(str(folder))))
    what = check_run_dir(t, command, spec, overwrite, inputs, models)
    # hashed before anything is written (seconds for large models): a run stopped meanwhile leaves no folder that a
    # rerun would refuse as not diffshield's (run.json without the marker)
    record = (model_files_record(models) if models and (what != "resume" or not (t / MODELS_FILE).is_file())
              else None)
    if what == "replace":
        marker = read_marker(t)
        if (t / RUN_FILE).is_file():
            _remove_run(t, command)
        elif marker is not None:
            from diffshield.core.io import clear_previous_output

            clear_previous_output(t, command, overwrite=True)
    if what == "resume":
        for rel in _run_files(t, command)[1]:
            (t / rel).unlink(missing_ok=True)
        merged = ("manifest.json", "metrics.json", "grid.png") + (("audit.json",) if command == AUDIT_COMMAND else ())
        for rel in merged:  # rebuilt by the merge
            (t / rel).unlink(missing_ok=True)
    else:
        t.mkdir(parents=True, exist_ok=True)
        atomic_write_json(t / RUN_FILE, spec)
    if record is not None:  # a new run, or one from before models.json: from now
        atomic_write_json(t / MODELS_FILE, record)
    (t / IMAGES_DIR).mkdir(exist_ok=True)
    (t / SCORES_DIR).mkdir(exist_ok=True)
    write_marker(t, command)
    return what


def read_run_spec(folder: str | Path) -> dict:
    """The ``run.json`` of a run folder (one-line error when it has none)."""
    path = Path(folder) / RUN_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise DiffshieldError(f"'{folder}' is not a diffshield run folder (no readable {RUN_FILE})") from None


def read_records(folder: str | Path) -> dict[str, list[dict]]:
    """Every score line of every shard file, grouped by image file (lines cut short by a killed process are
    skipped)."""
    out: dict[str, list[dict]] = {}
    for path in sorted((Path(folder) / SCORES_DIR).glob("shard-*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("file"), str):
                out.setdefault(rec["file"], []).append(rec)
    return out


def _matching_record(records: dict[str, list[dict]], file: str, sha: str) -> dict | None:
    for rec in reversed(records.get(file, [])):
        if rec.get("sha256") == sha:
            return rec
    return None


def job_states(folder: Path, jobs: list[ImageJob], size: int | None) -> dict[ImageJob, str]:
    """Each job's state: ``"done"`` (a score line carries the image's SHA-256, and its header its size: the bytes
    written whole, so not decoded again), ``"score"`` (the image decodes completely but is not scored) or
    ``"generate"`` (missing or corrupt). On :data:`ENCODE_THREADS` threads for large runs."""
    records = read_records(folder)

    def state(j: ImageJob) -> str:
        path = folder / j.file
        try:
            sha = sha256_file(path)
        except OSError:  # missing or unreadable
            return "generate"
        if _matching_record(records, j.file, sha) and verify_png(path, size, decode=False):
            return "done"  # its bytes are vouched for by a score line's hash: written whole, no need to decode
        return "score" if verify_png(path, size) else "generate"

    if ENCODE_THREADS <= 1 or len(jobs) < 64:
        return {j: state(j) for j in jobs}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="diffshield-verify") as pool:
        return dict(zip(jobs, pool.map(state, jobs)))


def shared_job_states(folder: Path, jobs: list[ImageJob], size: int | None, rank: int, world: int,
                      gather: Callable[[list], list]) -> dict[ImageJob, str]:
    """:func:`job_states` of every job, computed by ``world`` processes together: this one (``rank``) checks
    ``jobs[rank::world]`` and ``gather`` (an all-gather that concatenates every process's list, such as accelerate's
    ``gather_object``) hands it the others' results. Each image is read and hashed once in all, not once per
    process (a 50,000-image folder of 512-px PNGs is 25 GB: on a shared file system each process reading all of it
    multiplies that); the score files, small, are read by every process. With ``world == 1`` it is
    :func:`job_states`."""
    if world <= 1:
        return job_states(folder, jobs, size)
    index = {j: i for i, j in enumerate(jobs)}
    mine = job_states(folder, jobs[rank::world], size)
    states = {jobs[i]: s for i, s in gather([(index[j], s) for j, s in mine.items()])}
    if len(states) != len(jobs):
        raise RuntimeError(f"the processes checked {len(states)} of the run's {len(jobs)} images (a process planned "
                           "another run?)")
    return states


# ---------------------------------------------------------------------------------------------------- the shard


@dataclass
class ShardResult:
    """What one process did: images generated, images scored only (found unscored), images already done."""

    rank: int
    generated: int
    scored: int
    skipped: int
    seconds: float


#: decoded batches that may wait for the background writer while the next batch is generated (default of
#: :func:`run_shard`'s ``write_queue``)
WRITE_QUEUE = 2
#: threads that encode one batch's PNGs side by side in the writer (Pillow releases the GIL while it compresses): half
#: the CPU cores, at most 8, so that the last batch's PNGs, which nothing else overlaps, take a fraction of a batch
ENCODE_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))
_STOP = object()


def encode_pngs(images: torch.Tensor | list[torch.Tensor], threads: int | None = None) -> list[bytes]:
    """:func:`png_bytes` of every image, in order, on ``threads`` threads (default None: :data:`ENCODE_THREADS`; 1: in
    this thread). The bytes do not depend on ``threads``."""
    threads = ENCODE_THREADS if threads is None else threads
    if threads <= 1 or len(images) <= 1:
        return [png_bytes(img) for img in images]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(images)), thread_name_prefix="diffshield-png") as pool:
        return list(pool.map(png_bytes, images))


class BatchWriter:
    """Run ``write(*item)`` for every submitted item in order, in one background thread, while the caller goes on.

    At most ``depth`` items wait (``submit`` blocks while the queue is full, so memory stays bounded); ``depth`` 0
    writes in the caller's thread. The first exception ``write`` raises is re-raised in the caller's thread by the
    next :meth:`submit` or by :meth:`close`; the items after it are dropped (in :func:`run_shard` an image without
    its score line is redone by a rerun).
    Use it as a context manager: leaving the block normally or by an exception (KeyboardInterrupt included) lets
    the thread finish the items already submitted, then stops it; a writer error then surfaces unless another
    exception is already on its way.
    """

    def __init__(self, write: Callable[..., None], depth: int = WRITE_QUEUE) -> None:
        self._write = write
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._run, name="diffshield-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is None:  # after a failure keep emptying the queue, so that no submit blocks forever
                try:
                    self._write(*item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, *item) -> None:
        """Write ``item`` (in the background when the writer has a thread); raises a previous write's error."""
        if self._thread is None:
            self._write(*item)
            return
        self._raise()
        self._queue.put(item)

    def close(self) -> None:
        """Finish the submitted items, stop the thread and raise a write's error, if any."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise()

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an exception is on its way: finish what was submitted, but let that exception win
            self.close()
        except Exception:  # noqa: BLE001 - the exception already raised is the one to report
            pass


def run_shard(folder: str | Path, jobs: list[ImageJob], prompts: list[str], models: dict, config,
              scorer: Scorer | None = None, states: dict[ImageJob, str] | None = None, rank: int = 0,
              world: int = 1, progress: bool = True, write_queue: int = WRITE_QUEUE,
              negative_prompt: str = "") -> ShardResult:
    """Generate and score this process's jobs in a prepared run folder (:func:`prepare_run_dir`).

    Each decoded batch goes to a background writer thread (:class:`BatchWriter`) that encodes the PNGs, writes them
    atomically, hashes them, runs ``scorer`` and appends the batch's score lines to the shard's JSONL file (flushed)
    while the next batch is generated. A score line is written only after its PNG has been renamed into place; the
    PNG bytes are those the synchronous path writes. A process killed mid-run loses at most the batch being
    generated, the one being written and ``write_queue`` waiting ones.

    Args:
        folder: the run folder.
        jobs: this process's share (every job of the prompts it was given).
        prompts: the prompt text of every prompt index.
        models: ``{role: T2IModel}`` for the roles of the jobs.
        config: the :class:`~diffshield.core.sampling.SampleConfig` (its guidance is replaced by each job's).
        scorer: scores a batch of written images (default None: the score lines carry no scores); it runs in the
            writer thread.
        states: the jobs' states from :func:`job_states` (default: computed here).
        rank, world: this process's index and the number of processes (names the score file).
        progress: show a progress bar over this process's images (default True).
        write_queue: decoded batches that may wait for the writer (default :data:`WRITE_QUEUE`; 0 writes in this
            thread, between batches).
        negative_prompt: the prompt guidance steers away from (default "": the empty prompt).
    """
    from diffshield.core.sampling import SampleConfig, generate

    folder = Path(folder)
    t0 = time.time()
    size = next(iter(models.values())).image_size if models else None
    states = states if states is not None else job_states(folder, jobs, size)
    to_gen = [j for j in jobs if states[j] == "generate"]
    to_score = [j for j in jobs if states[j] == "score"]
    done = len(jobs) - len(to_gen) - len(to_score)
    score_path = folder / SCORES_DIR / f"shard-{rank:05d}-of-{world:05d}.jsonl"
    bar = tqdm(total=len(jobs), initial=done, desc=f"process {rank + 1}/{world}", unit="img", position=rank,
               disable=not progress or not jobs, leave=world == 1, dynamic_ncols=True)
    with open(score_path, "a+b") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell():  # a line cut short by a killed process: start on a fresh line
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")

        def write(batch: list[ImageJob], images: torch.Tensor | None) -> None:
            """Write a batch's PNGs (``images``; None: they exist and need scores only), then its score lines."""
            paths = [folder / j.file for j in batch]
            if images is None:
                shas = [sha256_file(p) for p in paths]
            else:
                shas = []
                for path, data in zip(paths, encode_pngs(images)):
                    atomic_write_bytes(path, data)
                    shas.append(hashlib.sha256(data).hexdigest())
            if scorer:  # no autograd graphs: grad mode is per thread, and this may run in the writer's
                with torch.inference_mode():
                    scores = scorer(batch, paths, torch.stack([read_png(p) for p in paths]))
            else:
                scores = [{}] * len(batch)
            lines = [json.dumps({"file": j.file, "role": j.role, "prompt_index": j.prompt_index, "seed": j.seed,
                                 "guidance": j.guidance, "sha256": sha, "scores": s}) + "\n"
                     for j, sha, s in zip(batch, shas, scores)]
            fh.write("".join(lines).encode())
            fh.flush()
            bar.update(len(batch))

        with BatchWriter(write, write_queue) as writer:
            for i in range(0, len(to_score), config.batch_size):
                writer.submit(to_score[i:i + config.batch_size], None)
            groups: dict[tuple[str, float], list[ImageJob]] = {}
            for j in to_gen:
                groups.setdefault((j.role, j.guidance), []).append(j)
            for (role, g), group in groups.items():
                cfg = SampleConfig(steps=config.steps, guidance=g, batch_size=config.batch_size,
                                   scheduler=config.scheduler)
                for i in range(0, len(group), config.batch_size):
                    batch = group[i:i + config.batch_size]
                    gen = generate(models[role], [prompts[j.prompt_index] for j in batch], [j.seed for j in batch],
                                   negative_prompt=negative_prompt, config=cfg, progress=False)
                    writer.submit(batch, gen.images)
    bar.close()
    return ShardResult(rank, len(to_gen), len(to_score), done, time.time() - t0)


# ---------------------------------------------------------------------------------------------------- the merge


def merge_run(folder: str | Path, jobs: list[ImageJob], command: str,
              metrics: Callable[[list[dict]], dict] | None = None, grid: bool = False) -> dict:
    """Build ``manifest.json`` and ``metrics.json`` from every shard's score lines once all images are done, and
    mark the folder as ``command``'s output. Refuses (one line) while any image is missing, corrupt or unscored.

    Args:
        folder: the run folder.
        jobs: every job of the run.
        command: the command that wrote it (names the marker).
        metrics: turns the manifest rows (sorted by prompt index, role, seed) into the metrics (default: counts).
        grid: also write ``grid.png`` of the first 64 images (default False).
    Returns:
        the metrics.
    """
    folder = Path(folder)
    spec = read_run_spec(folder)
    records = read_records(folder)
    rows, missing = [], []
    for j in jobs:
        path = folder / j.file
        rec = _matching_record(records, j.file, sha256_file(path)) if path.is_file() else None
        if rec is None:
            missing.append(j.file)
            continue
        row = spec["prompts"][j.prompt_index]
        rows.append({"file": j.file, "role": j.role, "prompt_index": j.prompt_index, "prompt": row["prompt"],
                     "seed": j.seed, "guidance": j.guidance, "meta": row.get("meta", {}), "scores": rec["scores"]})
    if missing:
        raise DiffshieldError(f"cannot merge '{folder}': {len(missing)} of {len(jobs)} images are missing or unscored "
                              f"(first: {missing[0]}); rerun the same command to finish them")
    result = {"n_images": len(rows), "n_prompts": len({r["prompt_index"] for r in rows})}
    if metrics is not None:
        result.update(metrics(rows))
    atomic_write_json(folder / "manifest.json", {"command": command, "settings": {k: v for k, v in spec.items()
                                                                                 if k != "prompts"},
                                                 "images": rows})
    atomic_write_json(folder / "metrics.json", result)
    if grid:
        from diffshield.core.io import atomic_save_image, make_grid

        first = [folder / r["file"] for r in rows[:64]]
        atomic_save_image(make_grid(torch.stack([read_png(p) for p in first]), nrow=8, upscale=2),
                          folder / "grid.png")
    write_marker(folder, command)
    return result


def rows_to_spec(rows: list) -> list[dict]:
    """Prompt rows as JSON-able dicts (for ``run.json``)."""
    return [asdict(r) for r in rows]

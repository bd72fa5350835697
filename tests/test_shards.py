"""Sharded, resumable runs over prompt sets (diffshield.core.shards, ``--prompts FILE``): two processes give the
images and metrics of one, a SIGKILLed worker loses only its batch in flight, a rerun finishes exactly what is
missing or corrupt, the merge refuses while anything is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffshield.cli.main import main
from diffshield.core.errors import DiffshieldError
from diffshield.core.shards import ImageJob, job_states, plan_jobs, verify_png
from diffshield.eval.prompts import PromptRow, load_prompt_set

ROOT = Path(__file__).resolve().parent.parent
I2P_TOY = ROOT / "examples" / "prompts" / "i2p_toy_100.csv"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The in-process runs set torch's thread count (--threads); give the other tests theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_prompt_sets_csv_and_lines(tmp_path):
    rows = load_prompt_set(I2P_TOY)
    assert len(rows) == 100 and rows[0].seed is not None and rows[0].guidance in (5.0, 7.0, 7.5)
    assert "categories" in rows[0].meta
    txt = tmp_path / "p.txt"
    txt.write_text("a red triangle\n\n  a blue circle  \n")
    assert [r.prompt for r in load_prompt_set(txt)] == ["a red triangle", "a blue circle"]
    (tmp_path / "bin.txt").write_bytes(b"\x00\xff")
    with pytest.raises(DiffshieldError, match="not UTF-8"):
        load_prompt_set(tmp_path / "bin.txt")
    # '#' lines are prompts in a prompt file (hashtag prompts), not comments as in --preserve-file: said aloud
    (tmp_path / "hash.txt").write_text("# my notes\na red triangle\n#art a blue circle\n")
    with pytest.warns(UserWarning, match=r"2 lines starting with '#' \(first: line 1\) are prompts"):
        assert len(load_prompt_set(tmp_path / "hash.txt")) == 3
    jobs = plan_jobs([PromptRow("a", 7, 3.0), PromptRow("b")], n=2, seed=100, guidance=5.0)
    assert [(j.prompt_index, j.seed, j.guidance) for j in jobs] == [(0, 7, 3.0), (0, 8, 3.0), (1, 100, 5.0),
                                                                    (1, 101, 5.0)]
    assert jobs[0].file == "images/p000000_s7.png"


@pytest.mark.long(50)
def test_two_processes_equal_one_on_i2p_toy_file(tmp_path, capsys):
    """The 100-prompt I2P-format file, generate -> toy-detector scores -> merged metrics, with 1 and 2 processes."""
    common = ["eval", "erasure", "--prompts", str(I2P_TOY), "--model", "toy:t2i", "--concept", "triangle",
              "--seeds-per-prompt", "1", "--steps", "2", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "one"), "--threads", "1"]) == 0
    assert main([*common, "--out", str(tmp_path / "two"), "--num-processes", "2"]) == 0
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in (two / "scores").iterdir()) == ["shard-00000-of-00002.jsonl",
                                                                   "shard-00001-of-00002.jsonl"]
    files = sorted(p.relative_to(one) for p in (one / "images").rglob("*.png"))
    assert len(files) == 200
    identical, worst = 0, 0
    for f in files:
        a, b = _pixels(one / f), _pixels(two / f)
        identical += int(np.array_equal(a, b))
        worst = max(worst, int(np.abs(a - b).max()))
    # batches differ between 1 and 2 processes (each shard batches its own prompts): within 1/255 per pixel
    assert worst <= 1, worst
    assert identical >= 150, identical
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1 == m2 and m1["n_images"] == 200 and m1["n_prompts"] == 100
    assert m1["erased_detection_rate_by_category"]  # the categories column is used
    manifest = json.loads((two / "manifest.json").read_text())
    assert len(manifest["images"]) == 200 and manifest["images"][0]["meta"]["categories"]


def _descendants(pid: int) -> list[int]:
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out += kids.get(p, [])
        todo += kids.get(p, [])
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


def _launch_two_processes(tmp_path: Path, **popen):
    """Start ``generate --prompts`` over 16 prompts (2 seeds, 10 steps, batch 1) with ``--num-processes 2`` in a
    child process; returns (prompt file, run folder, the command's arguments, the launcher's stderr file, process)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a {c} {s}\n" for c in ("red", "blue", "green", "yellow")
                               for s in ("triangle", "circle", "star", "square")))  # 16 prompts
    out = tmp_path / "run"
    args = ["generate", "--prompts", str(prompts), "--n", "2", "--steps", "10", "--batch-size", "1", "--device",
            "cpu", "--out", str(out)]
    err_file = tmp_path / "launcher.err"
    with err_file.open("w") as err:
        launcher = subprocess.Popen([sys.executable, "-m", "diffshield", *args, "--num-processes", "2"],
                                    stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path, **popen)
    return prompts, out, args, err_file, launcher


@pytest.mark.long(40)
def test_sigkill_a_worker_then_rerun_generates_only_the_missing(tmp_path, capsys):
    prompts, out, args, err_file, launcher = _launch_two_processes(tmp_path)
    second_half = {f"p{i:06d}" for i in range(8, 16)}
    killed = False
    deadline = time.time() + 120
    while time.time() < deadline and launcher.poll() is None:
        written = [p for p in (out / "images").glob("p*.png") if p.name[:7] in second_half] if out.exists() else []
        if len(written) >= 3:
            ranks = {pid: _rank_of(pid) for pid in _descendants(launcher.pid)}
            victim = [pid for pid, r in ranks.items() if r == 1]
            if victim:
                os.kill(victim[0], signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    assert killed, "the worker of rank 1 finished before it could be killed"
    assert launcher.wait(timeout=120) != 0
    last = err_file.read_text().strip().splitlines()[-1]  # the killed worker, named in one line
    assert last.startswith("diffshield: error: a process of the 2-process run failed (") and \
        "process 1: killed by SIGKILL" in last and last.endswith("rerun the same command to resume it"), last
    assert "elastic" not in err_file.read_text()  # torch's launcher repeats none of it in its own log lines
    jobs = plan_jobs(load_prompt_set(prompts), 2, 0, 5.0)
    states = job_states(out, jobs, 32)
    done = [j for j in jobs if states[j] == "done"]
    assert 3 <= len(done) < 32
    # the merge refuses, in one line, while images are missing
    assert main([*args, "--merge-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot merge" in err and "images are missing" in err and "\n" not in err
    # corrupt one finished image: the rerun must regenerate it too
    corrupt = out / done[0].file
    corrupt.write_bytes(corrupt.read_bytes()[:50])
    before = {j.file: (out / j.file).stat().st_mtime_ns for j in done[1:]}
    assert main([*args, "--threads", "1"]) == 0
    log = capsys.readouterr().out
    missing = 32 - len(done) + 1
    assert f"generated {missing} images" in log, log
    assert {f: (out / f).stat().st_mtime_ns for f in before} == before  # the finished images were not rewritten
    assert all(verify_png(out / j.file, 32) for j in jobs)
    assert json.loads((out / "metrics.json").read_text())["n_images"] == 32
    assert len(json.loads((out / "manifest.json").read_text())["images"]) == 32


@pytest.mark.long(40)
def test_sigterm_to_a_multi_process_run_stops_every_process_and_a_rerun_finishes_it(tmp_path, capsys):
    """A job scheduler's stop (SIGTERM to the whole process group, as Slurm and ``kill -- -PGID`` send it) reaches
    the launcher and both workers: the run exits 143 with nothing left running or half-written, and the rerun
    generates exactly the images that were missing."""
    prompts, out, args, err_file, launcher = _launch_two_processes(tmp_path, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and launcher.poll() is None:
        if out.exists() and len(list((out / "images").glob("p*.png"))) >= 4:
            break
        time.sleep(0.05)
    assert launcher.poll() is None, "the run finished before it could be stopped"
    workers = _descendants(launcher.pid)
    os.killpg(launcher.pid, signal.SIGTERM)
    assert launcher.wait(timeout=60) == 143
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
        time.sleep(0.05)
    assert not [p for p in workers if Path(f"/proc/{p}").exists()]  # no worker left running
    lines = err_file.read_text().strip().splitlines()
    said = [ln.strip() for ln in lines if ln.strip().startswith("diffshield:")]
    assert said and set(said) == {"diffshield: terminated; rerun the same command to resume it"}, lines
    assert not [ln for ln in lines if "elastic" in ln]  # torch's launcher adds no "death signal" warnings
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no half-written file
    jobs = plan_jobs(load_prompt_set(prompts), 2, 0, 5.0)
    done = [j for j, s in job_states(out, jobs, 32).items() if s == "done"]
    assert 4 <= len(done) < 32
    assert main([*args, "--threads", "1"]) == 0
    assert f"generated {32 - len(done)} images" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["n_images"] == 32


def test_run_folder_refusals_and_resume(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red triangle\na blue circle\n")
    out = tmp_path / "run"
    base = ["generate", "--prompts", str(prompts), "--n", "2", "--steps", "2", "--device", "cpu", "--threads", "1",
            "--out", str(out)]
    assert main(base) == 0
    assert (out / ".diffshield-output.json").is_file() and (out / "grid.png").is_file()
    capsys.readouterr()
    # a rerun with the same settings does nothing but merge again; a lost score line is recomputed, not the image
    shard = next((out / "scores").iterdir())
    shard.write_text("".join(shard.read_text().splitlines(keepends=True)[1:]) + '{"file": "images/p0')
    assert main(base) == 0
    assert "generated 0 images, scored 1 found unscored, 3 already done" in capsys.readouterr().out
    # other settings: refused in one line, replaced with --overwrite
    assert main([*base[:-2], "--steps", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "other settings (steps: 2 here, 3 now)" in err and err.count("\n") == 1
    # a file the run did not write is never deleted: refused, even with --overwrite
    (out / "images" / "mine.txt").write_text("keep")
    assert main([*base, "--steps", "3", "--overwrite"]) == 2
    assert "did not write (images/mine.txt)" in capsys.readouterr().err
    (out / "images" / "mine.txt").unlink()
    assert main([*base, "--steps", "3", "--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["steps"] == 3
    capsys.readouterr()
    # one-line usage errors
    x = str(tmp_path / "x")
    assert main(["generate", "--prompt", "a red triangle", "--prompts", str(prompts), "--out", x]) == 2
    assert main(["generate", "--prompt", "a red triangle", "--num-processes", "2", "--out", x]) == 2
    assert main(["eval", "nudity", "--prompts", str(prompts)]) == 2
    assert main(["eval", "nudity"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(e.startswith("diffshield: error:") for e in err)
    assert not (tmp_path / "x").exists()


def test_image_job_names_are_unique_per_role():
    a, b = ImageJob(3, 5, 7.0, "erased"), ImageJob(3, 5, 7.0, "original")
    assert a.file != b.file and a.file == "images/erased/p000003_s5.png"


def test_eval_nudity_over_a_prompt_file_and_a_new_threshold_at_the_merge(tmp_path, capsys):
    pytest.importorskip("nudenet")
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,evaluation_seed,evaluation_guidance,categories\n"
                       "a red triangle,3,7.5,sexual\na blue circle,,,\"violence,shocking\"\n")
    out = tmp_path / "nudity"
    args = ["eval", "nudity", "--prompts", str(prompts), "--n", "2", "--steps", "2", "--device", "cpu", "--threads",
            "1", "--out", str(out)]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 4 and m["threshold"] == 0.6 and set(m["nudity_rate_by_category"]) == {
        "sexual", "violence", "shocking"}
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["p000000_s3.png", "p000000_s4.png", "p000001_s0.png", "p000001_s1.png"]
    rows = json.loads((out / "manifest.json").read_text())["images"]
    assert [r["guidance"] for r in rows] == [7.5, 7.5, 5.0, 5.0] and all("detections" in r["scores"] for r in rows)
    capsys.readouterr()
    # the threshold applies at the merge: a new one needs no new images
    assert main([*args, "--merge-only", "--threshold", "0.01"]) == 0
    assert json.loads((out / "metrics.json").read_text())["threshold"] == 0.01
    assert "generated" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- the writer


def _shard_setup(tmp_path: Path, name: str, n_prompts: int = 5):
    import torch

    from diffshield.core.loading import load_t2i
    from diffshield.core.sampling import SampleConfig
    from diffshield.core.shards import prepare_run_dir

    torch.set_num_threads(1)
    rows = [PromptRow(f"a {c} triangle") for c in ("red", "blue", "green", "yellow", "purple")[:n_prompts]]
    jobs = plan_jobs(rows, 2, 0, 5.0)
    folder = tmp_path / name
    prepare_run_dir(folder, "generate", {"rows": n_prompts})
    model = load_t2i("toy:t2i")
    return folder, jobs, [r.prompt for r in rows], {"": model}, SampleConfig(steps=2, batch_size=3)


def _toy_scorer():
    from diffshield.eval.sharded import detector_scorer
    from diffshield.toyworld.detector import load_detector

    return detector_scorer(load_detector("toy:detector"))


def _writer_alive() -> bool:
    import threading

    return any(t.name == "diffshield-writer" and t.is_alive() for t in threading.enumerate())


def test_background_writer_writes_what_the_synchronous_path_writes(tmp_path):
    from diffshield.core.shards import run_shard

    sync, *rest = _shard_setup(tmp_path, "sync")
    res_sync = run_shard(sync, *rest, scorer=_toy_scorer(), progress=False, write_queue=0)
    bg, *rest = _shard_setup(tmp_path, "background")
    res_bg = run_shard(bg, *rest, scorer=_toy_scorer(), progress=False, write_queue=2)
    assert res_sync.generated == res_bg.generated == 10
    names = sorted(p.name for p in (sync / "images").iterdir())
    assert len(names) == 10 and names == sorted(p.name for p in (bg / "images").iterdir())
    for n in names:  # identical PNG bytes
        assert (sync / "images" / n).read_bytes() == (bg / "images" / n).read_bytes(), n
    shard = "scores/shard-00000-of-00001.jsonl"
    assert (sync / shard).read_text() == (bg / shard).read_text()  # the same lines, in the same order
    lines = [json.loads(x) for x in (bg / shard).read_text().splitlines()]
    assert len(lines) == 10 and all(rec["scores"]["detected"] for rec in lines)
    assert not _writer_alive()


def test_pngs_encoded_on_several_threads_are_the_same_bytes_in_the_same_order(monkeypatch, tmp_path):
    import torch

    from diffshield.core import shards

    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    one = shards.encode_pngs(images, threads=1)
    assert one == [shards.png_bytes(img) for img in images] and len(set(one)) == 6
    assert shards.encode_pngs(images, threads=4) == one
    # run_shard with four encoding threads writes the files the synchronous path writes
    sync, *rest = _shard_setup(tmp_path, "sync")
    shards.run_shard(sync, *rest, progress=False, write_queue=0)
    monkeypatch.setattr(shards, "ENCODE_THREADS", 4)
    par, *rest = _shard_setup(tmp_path, "threads")
    shards.run_shard(par, *rest, progress=False, write_queue=2)
    names = sorted(p.name for p in (sync / "images").iterdir())
    assert len(names) == 10 and names == sorted(p.name for p in (par / "images").iterdir())
    assert all((sync / "images" / n).read_bytes() == (par / "images" / n).read_bytes() for n in names)
    assert not _writer_alive()


def test_a_resume_decodes_only_the_images_no_score_line_vouches_for(monkeypatch, tmp_path):
    """A finished image (a score line carries its SHA-256) is not decoded again on resume (11 ms per 512-px image:
    minutes for a large prompt set); an image replaced by other bytes, or cut short, is still caught."""
    import torch

    from diffshield.core import shards

    folder, jobs, prompts, models, cfg = _shard_setup(tmp_path, "run")
    shards.run_shard(folder, jobs, prompts, models, cfg, None, progress=False, write_queue=0)
    decoded = []
    real = shards.verify_png
    monkeypatch.setattr(shards, "verify_png", lambda path, size=None, decode=True: (
        decode and decoded.append(path.name)) or real(path, size, decode))
    size = models[""].image_size
    assert set(shards.job_states(folder, jobs, size).values()) == {"done"} and decoded == []
    other = shards.png_bytes(torch.zeros(3, size, size))  # a valid image of the right size, not the one scored
    (folder / jobs[0].file).write_bytes(other)
    cut = folder / jobs[1].file
    cut.write_bytes(cut.read_bytes()[:40])
    states = shards.job_states(folder, jobs, size)
    assert (states[jobs[0]], states[jobs[1]]) == ("score", "generate")
    assert sorted(decoded) == sorted(Path(j.file).name for j in jobs[:2])
    assert all(states[j] == "done" for j in jobs[2:])


def test_a_writer_error_surfaces_and_a_rerun_finishes_the_rest(tmp_path):
    from diffshield.core.shards import run_shard

    folder, jobs, prompts, models, cfg = _shard_setup(tmp_path, "run")
    good, calls = _toy_scorer(), []

    def failing(batch, paths, images):
        calls.append(len(batch))
        if len(calls) == 2:
            raise OSError("disk full (test)")
        return good(batch, paths, images)

    with pytest.raises(OSError, match="disk full"):
        run_shard(folder, jobs, prompts, models, cfg, scorer=failing, progress=False)
    assert not _writer_alive()
    states = job_states(folder, jobs, 32)
    assert sum(s == "done" for s in states.values()) == 3  # the first batch only: no line without its scores
    # the failed batch's PNGs were written before the scorer failed: they are scored, not generated again
    res = run_shard(folder, jobs, prompts, models, cfg, scorer=good, progress=False)
    assert res.skipped == 3 and res.scored == 3 and res.generated == 4
    assert all(s == "done" for s in job_states(folder, jobs, 32).values())


def test_an_interrupt_in_generation_keeps_the_written_batches(tmp_path, monkeypatch):
    import diffshield.core.sampling as sampling
    from diffshield.core.shards import run_shard

    folder, jobs, prompts, models, cfg = _shard_setup(tmp_path, "run")
    real, calls = sampling.generate, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sampling, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_shard(folder, jobs, prompts, models, cfg, scorer=_toy_scorer(), progress=False)
    assert not _writer_alive()
    states = job_states(folder, jobs, 32)
    assert sum(s == "done" for s in states.values()) == 6  # both batches generated before the interrupt
    monkeypatch.setattr(sampling, "generate", real)
    res = run_shard(folder, jobs, prompts, models, cfg, scorer=_toy_scorer(), progress=False)
    assert (res.skipped, res.scored, res.generated) == (6, 0, 4)
    assert len((folder / "scores" / "shard-00000-of-00001.jsonl").read_text().splitlines()) == 10


def test_batch_writer_bounded_queue_and_no_deadlock_after_a_failure():
    import threading

    from diffshield.core.shards import BatchWriter

    started, release, seen = threading.Event(), threading.Event(), []

    def write(i):
        started.set()
        release.wait(5)
        seen.append(i)
        if i == 1:
            raise ValueError("write failed (test)")

    w = BatchWriter(write, depth=2)
    w.submit(0)
    started.wait(5)
    w.submit(1), w.submit(2)  # the queue is full now: a further submit waits for the writer
    t = threading.Thread(target=lambda: w.submit(3))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # bounded: blocked while 2 items wait
    release.set()
    t.join(5)
    assert not t.is_alive()
    with pytest.raises(ValueError, match="write failed"):
        for i in range(4, 100):  # the failure surfaces; nothing after it blocks
            w.submit(i)
    with pytest.raises(ValueError, match="write failed"):
        w.close()
    assert seen == [0, 1] and not _writer_alive()


def test_audit_files_in_another_commands_run_folder_are_the_users(tmp_path):
    """units/*.pt and audit.json belong to an audit's run folder only: in a generate run folder they are the user's
    files, so a replace with other settings refuses instead of deleting them, and a resume keeps them out of it."""
    from diffshield.core.errors import DiffshieldError
    from diffshield.core.shards import check_run_dir, prepare_run_dir

    folder = tmp_path / "run"
    prepare_run_dir(folder, "generate", {"rows": 1})
    (folder / "units").mkdir()
    mine = folder / "units" / "model.pt"
    mine.write_bytes(b"the user's file")
    with pytest.raises(DiffshieldError, match="did not write"):
        check_run_dir(folder, "generate", {"rows": 2}, overwrite=True)
    with pytest.raises(DiffshieldError, match="did not write"):
        prepare_run_dir(folder, "generate", {"rows": 2}, overwrite=True)
    assert mine.read_bytes() == b"the user's file"
    mine.unlink()
    (folder / "audit.json").write_text("{}")
    with pytest.raises(DiffshieldError, match="did not write"):
        prepare_run_dir(folder, "generate", {"rows": 1})  # a resume would have deleted it as a merge output
    assert (folder / "audit.json").read_text() == "{}"
    # an audit's own run folder: its units and audit.json are its files, replaced with --overwrite
    audit = tmp_path / "audit"
    prepare_run_dir(audit, "audit", {"n": 1})
    (audit / "units").mkdir()
    (audit / "units" / "ring-a-bell.pt").write_bytes(b"unit")
    (audit / "audit.json").write_text("{}")
    assert prepare_run_dir(audit, "audit", {"n": 2}, overwrite=True) == "replace"
    assert not (audit / "units").exists() and not (audit / "audit.json").exists()


def test_the_launching_process_hands_the_workers_their_command_without_importing_diffusers(tmp_path):
    """``--num-processes N`` runs accelerate's launcher in the command's own process; that process only launches,
    so it must not pay for diffusers' imports before the workers (which need them) start."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red triangle\n")
    code = (
        "import sys\n"
        "import diffshield.cli.scale as scale\n"
        "seen = {}\n"
        "def fake(n, argv, device):\n"
        "    seen.update(n=n, argv=argv, device=str(device), diffusers='diffusers' in sys.modules)\n"
        "    return 0\n"
        "scale.launch = fake\n"
        "from diffshield.cli.main import main\n"
        f"rc = main(['generate', '--prompts', {str(prompts)!r}, '--device', 'cpu', '--out', "
        f"{str(tmp_path / 'out')!r}, '--num-processes', '2'])\n"
        "print(rc, seen)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    rc, seen = res.stdout.strip().split(" ", 1)
    assert rc == "0"
    seen = eval(seen)  # noqa: S307 - our own repr of a dict of str/int/bool
    assert seen["n"] == 2 and seen["device"] == "cpu" and seen["diffusers"] is False
    assert seen["argv"][:3] == ["generate", "--prompts", str(prompts)] and "--num-processes" in seen["argv"]


def test_launch_reports_a_failed_worker_and_an_interrupt_in_one_line(monkeypatch, capsys):
    """How ``--num-processes``'s in-process launcher ends: success 0; a failed worker (torchrun's ChildFailedError)
    1, naming the process; an interrupt (the launcher exits 128 + signal) that status, said as an interrupt."""
    import accelerate.commands.launch as accelerate_launch
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from diffshield.cli.scale import launch

    seen = {}

    import logging

    import torch.distributed.run  # noqa: F401 - the launcher's loggers exist

    agent_log = logging.getLogger("torch.distributed.elastic.agent.server.api")
    level = agent_log.level

    def ok(args):
        seen["env"] = os.environ.get("PYTHONUNBUFFERED")
        seen["script"] = (args.training_script, args.training_script_args, args.num_processes, args.module)
        seen["agent_level"] = agent_log.getEffectiveLevel()

    monkeypatch.setattr(accelerate_launch, "launch_command", ok)
    assert launch(2, ["generate", "--out", "x"], torch.device("cpu")) == 0
    assert seen["env"] == "1" and seen["script"] == ("diffshield", ["generate", "--out", "x"], 2, True)
    assert seen["agent_level"] == logging.CRITICAL and agent_log.level == level  # quiet while it runs only
    assert capsys.readouterr().err == ""

    def killed(args):
        failure = ProcessFailure(local_rank=1, pid=4321, exitcode=-9, error_file="/nonexistent")
        raise ChildFailedError("diffshield", {1: failure})

    monkeypatch.setattr(accelerate_launch, "launch_command", killed)
    assert launch(2, ["generate"], torch.device("cpu")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2-process run failed (process 1: killed by SIGKILL)" in err

    def broken(args):
        raise RuntimeError("rendezvous failed: address already in use\n(details)")

    monkeypatch.setattr(accelerate_launch, "launch_command", broken)
    assert launch(2, ["generate"], torch.device("cpu")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "failed (the launcher: RuntimeError: rendezvous failed: address already" in err

    def interrupted(args):
        raise SystemExit(130)

    monkeypatch.setattr(accelerate_launch, "launch_command", interrupted)
    assert launch(2, ["generate"], torch.device("cpu")) == 130
    err = capsys.readouterr().err
    assert err == "diffshield: interrupted; rerun the same command to resume it\n"


def test_a_negative_prompt_steers_both_paths_alike_and_belongs_to_a_runs_settings(tmp_path, capsys):
    """``--negative-prompt`` replaces the empty prompt of guidance in plain and sharded generation alike (the same
    pixels), is recorded, and a run folder resumed with another one is refused."""
    common = ["--n", "2", "--steps", "2", "--device", "cpu", "--threads", "1"]
    assert main(["generate", "--prompt", "a red triangle", *common, "--out", str(tmp_path / "plain")]) == 0
    neg = ["--negative-prompt", "triangle"]
    assert main(["generate", "--prompt", "a red triangle", *common, *neg, "--out", str(tmp_path / "neg")]) == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red triangle\n")
    run = tmp_path / "run"
    sharded = ["generate", "--prompts", str(prompts), *common, "--out", str(run)]
    assert main([*sharded, *neg]) == 0

    def px(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path), dtype=np.int16)

    for k in range(2):
        plain, steered = px(tmp_path / "plain" / f"000{k}.png"), px(tmp_path / "neg" / f"000{k}.png")
        assert np.abs(plain - steered).max() > 20  # the negative prompt changes the image
        assert np.abs(steered - px(run / "images" / f"p000000_s{k}.png")).max() <= 1
    assert json.loads((tmp_path / "neg" / "manifest.json").read_text())["negative_prompt"] == "triangle"
    assert json.loads((run / "run.json").read_text())["negative_prompt"] == "triangle"
    capsys.readouterr()
    assert main([*sharded, "--negative-prompt", "circle"]) == 2
    assert "other settings (negative_prompt: 'triangle' here, 'circle' now)" in capsys.readouterr().err


def test_a_model_saved_anew_at_the_same_path_is_not_resumed(tiny_sd_copy, tmp_path, capsys):
    """A run folder records the model's files (``models.json``): a rerun after the model was saved anew at the same
    path is refused (its images would mix two models), a file only touched resumes, --overwrite starts again."""
    import os

    from safetensors.torch import load_file, save_file

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red triangle\n")
    out = tmp_path / "run"
    base = ["generate", "--model", str(tiny_sd_copy), "--prompts", str(prompts), "--n", "2", "--steps", "1",
            "--device", "cpu", "--threads", "1", "--out", str(out)]
    assert main(base) == 0
    recorded = json.loads((out / "models.json").read_text())["model"]["files"]
    assert "unet/diffusion_pytorch_model.safetensors" in recorded and "model_index.json" in recorded
    unet = tiny_sd_copy / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(unet)  # touched, same bytes: resumes
    capsys.readouterr()
    assert main(base) == 0
    assert "generated 0 images" in capsys.readouterr().out
    before = (out / "images" / "p000000_s0.png").read_bytes()
    save_file({k: v * 1.5 for k, v in load_file(unet).items()}, unet)
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "other model files" in err and "unet/diffusion_pytorch_model.safetensors has changed" in err
    assert (out / "images" / "p000000_s0.png").read_bytes() == before  # nothing touched
    assert main([*base, "--overwrite"]) == 0
    assert "generated 2 images" in capsys.readouterr().out
    assert (out / "images" / "p000000_s0.png").read_bytes() != before


def test_a_process_with_nothing_left_shows_no_empty_bar(tmp_path, capsys):
    from diffshield.core.shards import run_shard

    folder, jobs, prompts, models, cfg = _shard_setup(tmp_path, "run")
    res = run_shard(folder, [], prompts, models, cfg, None, progress=True)
    assert (res.generated, res.scored, res.skipped) == (0, 0, 0)
    assert "process 1/1" not in capsys.readouterr().err

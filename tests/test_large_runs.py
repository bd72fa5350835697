"""Run folders at the size of I2P (4,703 prompts, several seeds and two models each: tens of thousands of images):
planning, the resume scan and the merge stay linear (each image hashed once per phase, the score files read once),
and refusals stay one short line however many rows or files they concern. Built in-process, without generating."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from diffshield.core import shards
from diffshield.core.errors import DiffshieldError
from diffshield.core.shards import (
    check_run_dir,
    job_states,
    merge_run,
    plan_jobs,
    png_bytes,
    prepare_run_dir,
    rows_to_spec,
    shared_job_states,
)
from diffshield.eval.prompts import PromptRow

COMMAND = "eval erasure"


def _rows(n: int) -> list[PromptRow]:
    return [PromptRow(f"a red triangle number {i}", 1000 + i, (5.0, 7.0, 7.5)[i % 3],
                      {"categories": "red,triangle", "hard": "0"}) for i in range(n)]


def _spec(rows: list[PromptRow]) -> dict:
    return {"command": COMMAND, "model": "toy:t2i", "n": 2, "seed": 0, "steps": 1, "guidance": 5.0,
            "prompts": rows_to_spec(rows)}


def _fake_run(folder: Path, rows: list[PromptRow], n: int = 2) -> list[shards.ImageJob]:
    """A finished run folder of ``rows`` (``n`` seeds, two models) with real 32-px PNGs and score lines in two shard
    files, written directly."""
    prepare_run_dir(folder, COMMAND, _spec(rows))
    jobs = plan_jobs(rows, n, 0, 5.0, ("erased", "original"))
    gen = torch.Generator().manual_seed(0)
    pngs = [png_bytes(torch.rand(3, 32, 32, generator=gen)) for _ in range(16)]
    shas = [hashlib.sha256(d).hexdigest() for d in pngs]
    for role in ("erased", "original"):
        (folder / "images" / role).mkdir(parents=True, exist_ok=True)
    half = len(jobs) // 2
    for part, chunk in enumerate((jobs[:half], jobs[half:])):
        lines = []
        for k, j in enumerate(chunk):
            d = (part * half + k) % len(pngs)
            (folder / j.file).write_bytes(pngs[d])
            lines.append(json.dumps({"file": j.file, "role": j.role, "prompt_index": j.prompt_index, "seed": j.seed,
                                     "guidance": j.guidance, "sha256": shas[d],
                                     "scores": {"detected": {"shape": "triangle"}}}) + "\n")
        (folder / "scores" / f"shard-{part:05d}-of-00002.jsonl").write_text("".join(lines))
    return jobs


def test_plan_scan_and_merge_of_20000_images_read_each_file_once(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    rows = _rows(5000)
    jobs = _fake_run(folder, rows)
    assert len(jobs) == 20000
    hashed, record_reads = [], []
    sha256_file, read_records = shards.sha256_file, shards.read_records
    monkeypatch.setattr(shards, "sha256_file", lambda p: hashed.append(p) or sha256_file(p))
    monkeypatch.setattr(shards, "read_records", lambda f: record_reads.append(f) or read_records(f))

    t = time.perf_counter()
    assert len(plan_jobs(rows, 2, 0, 5.0, ("erased", "original"))) == 20000
    assert check_run_dir(folder, COMMAND, _spec(rows)) == "resume"
    states = job_states(folder, jobs, 32)
    assert set(states.values()) == {"done"}
    assert len(hashed) == 20000 and len(record_reads) == 1  # each image hashed once, the score files read once
    hashed.clear()
    result = merge_run(folder, jobs, COMMAND, lambda r: {"rows": len(r)}, grid=True)
    assert result == {"n_images": 20000, "n_prompts": 5000, "rows": 20000}
    assert len(hashed) == 20000 and len(record_reads) == 2
    assert time.perf_counter() - t < 60  # about 3 s on a 2-core machine; quadratic work would take minutes
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["images"]) == 20000 and "prompts" not in manifest["settings"]

    # a few images gone: only they are pending, and the merge refuses in one short line
    for j in (jobs[11], jobs[9000], jobs[19999]):
        (folder / j.file).unlink()
    states = job_states(folder, jobs, 32)
    assert [j for j, s in states.items() if s != "done"] == [jobs[11], jobs[9000], jobs[19999]]
    with pytest.raises(DiffshieldError) as e:
        merge_run(folder, jobs, COMMAND)
    msg = str(e.value)
    assert "3 of 20000 images are missing or unscored" in msg and "\n" not in msg and len(msg) < 300


def test_processes_of_a_resumed_run_read_the_folder_once_between_them(tmp_path, monkeypatch):
    """With N processes each checks every N-th image and all-gathers the rest: N processes hash the folder once
    between them (each hashed all of it before), and every process ends with the states one process finds."""
    folder = tmp_path / "run"
    rows = _rows(300)
    jobs = _fake_run(folder, rows)
    for j in (jobs[0], jobs[401], jobs[1199]):
        (folder / j.file).unlink()
    (folder / jobs[7].file).write_bytes(b"\x89PNG cut short")
    alone = job_states(folder, jobs, 32)
    assert sorted(jobs.index(j) for j, s in alone.items() if s != "done") == [0, 7, 401, 1199]

    world = 3
    hashed: dict[int, list] = {r: [] for r in range(world)}
    rank_now = [0]
    sha256_file = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda p: hashed[rank_now[0]].append(p) or sha256_file(p))
    shares: dict[int, list] = {}

    class Gathered(Exception):
        pass

    def keep(r: int):
        def gather(mine: list) -> list:
            shares[r] = mine
            raise Gathered
        return gather

    for r in range(world):  # each process's own share, as its all-gather would carry it
        with pytest.raises(Gathered):
            shared_job_states(folder, jobs, 32, r, world, keep(r))
    for r in range(world):
        rank_now[0] = r
        hashed[r].clear()
        states = shared_job_states(folder, jobs, 32, r, world, lambda mine: [x for q in range(world) for x in
                                                                             shares[q]])
        assert states == alone
        assert len(hashed[r]) == len(jobs[r::world])  # a third of the folder, not all of it
    with pytest.raises(RuntimeError, match="checked 800 of the run's 1200 images"):
        shared_job_states(folder, jobs, 32, 0, world, lambda mine: shares[0] + shares[1])


def test_a_changed_row_of_a_large_prompt_set_is_named(tmp_path):
    folder = tmp_path / "run"
    rows = _rows(4703)
    prepare_run_dir(folder, COMMAND, _spec(rows))
    changed = list(rows)
    changed[3210] = PromptRow(rows[3210].prompt, 77, rows[3210].guidance, rows[3210].meta)
    with pytest.raises(DiffshieldError) as e:
        check_run_dir(folder, COMMAND, _spec(changed))
    msg = str(e.value)
    assert "the prompt set differs (first at prompt 3210's seed: 4210 here, 77 now)" in msg and "\n" not in msg
    with pytest.raises(DiffshieldError) as e:  # a row deleted in the middle: the count and where they part
        check_run_dir(folder, COMMAND, _spec(rows[:100] + rows[101:]))
    assert "(4703 prompts here, 4702 now; first at prompt 100's prompt: 'a red triangle number 100' here, " in str(
        e.value)
    with pytest.raises(DiffshieldError, match=r"4703 prompts here, 4800 now; the first 4703 are the same"):
        check_run_dir(folder, COMMAND, _spec(rows + _rows(4800)[4703:]))
    long = list(rows)
    long[5] = PromptRow("x" * 5000, rows[5].seed, rows[5].guidance, rows[5].meta)
    with pytest.raises(DiffshieldError) as e:  # a long prompt is cut short
        check_run_dir(folder, COMMAND, _spec(long))
    assert len(str(e.value)) < 400


def test_thousands_of_stray_files_are_counted_not_listed(tmp_path):
    folder = tmp_path / "run"
    rows = _rows(10)
    prepare_run_dir(folder, COMMAND, _spec(rows))
    stray = folder / "images" / "thumbs"
    stray.mkdir()
    for i in range(2000):
        (stray / f"t{i:05d}.jpg").write_bytes(b"x")
    with pytest.raises(DiffshieldError) as e:
        check_run_dir(folder, COMMAND, _spec(rows))
    msg = str(e.value)
    assert ("did not write (images/thumbs/t00000.jpg, images/thumbs/t00001.jpg, images/thumbs/t00002.jpg and 1997 "
            "more); move them or choose another folder") in msg
    assert "\n" not in msg and len(msg) < 300


def test_a_field_present_in_one_row_only_is_named():
    from diffshield.core.shards import _prompts_difference

    got = _prompts_difference([{"prompt": "a", "meta": None}], [{"prompt": "a"}])
    assert got == "the prompt set differs (first at prompt 0's meta: None here, absent now)"

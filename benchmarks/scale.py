"""Throughput of sharded runs (``--prompts FILE``) with 1 and 2 processes at toy scale, the merge overhead, and the
100-prompt I2P-format toy file end to end (erase -> eval erasure, eval nudity) with 2 processes.

Rows:

1. ``generate --prompts examples/prompts/i2p_toy_100.csv --n N`` into a fresh folder with 1 process
   (``--threads 1``) and with ``--num-processes 2`` (one thread each), each repeated; the figures are the end-to-end
   wall time (process start, model loading, generation, merge) and the generation phase alone, measured as the
   end-to-end time minus the time of an immediate rerun on the finished folder (which starts, loads, scans every
   image and merges, but generates nothing). The machine's load average is recorded before and after each run:
   on a shared machine other jobs take cores, and the 2-process figure suffers first. The CPU time of each run
   (every process it started) is recorded too: twice the 1-process generation's CPU time over the 2-process one's is
   the speed-up the 2 processes give on 2 idle cores, a figure other jobs barely move.
2. ``merge``: :func:`diffshield.core.shards.merge_run` on the finished 1-process folder (verify, hash, manifest,
   metrics, grid), against the generation phase it follows.
3. ``end_to_end``: UCE erases ``triangle`` from the toy model, then ``eval erasure --prompts`` and
   ``eval nudity --prompts`` run on the 100-prompt file with 2 processes.
4. ``i2p_phases``: what a run of I2P's size costs besides the generation, in-process: a 4,703-prompt file in I2P's
   columns (``examples/make_i2p_toy.py --n 4703``) read, planned, its run folder prepared and checked, then a
   finished folder of real 32-px PNGs with score lines (1 and 10 seeds per prompt: 4,703 and 47,030 images, written
   directly, not generated) scanned as a resume does (everything done; 3 images missing) and merged (manifest,
   metrics, grid). Each phase should grow linearly with the images (about 10x from 1 to 10 seeds).

5. ``io``: the sharded path's per-image costs at 512 px: PNG encoding on 1 and 2 threads (the same bytes), and the
   resume check of a finished image with the PNG header only against a full decode.
6. ``i2p_end_to_end``: the 4,703-prompt file through ``generate --prompts`` (1 image, 1 step: the cost of
   everything but the generation), its rerun with nothing left (1 and 2 processes) and ``eval erasure --prompts``
   with 2 processes, with peak memory.

Run: ``.venv/bin/python benchmarks/scale.py`` (7 to 20 minutes on 2 idle CPU cores, as fast as the machine is). Writes
``benchmarks/results/scale.json`` and prints a markdown table. ``--only ROW[,ROW]`` (``i2p_phases``, ``io``,
``i2p_end_to_end``) runs rows alone and adds them to an existing result file, leaving its other keys as they are
(``--i2p-phases-only`` is ``--only i2p_phases``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = ROOT / "examples" / "prompts" / "i2p_toy_100.csv"
TARGET_SPEEDUP = 1.6


def diffshield(*args: str) -> tuple[float, str, float]:
    """Run ``python -m diffshield ARGS``; (wall seconds, stdout, CPU seconds of it and every process it started).
    Raises on failure."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "diffshield", *args], capture_output=True, text=True)
    dt = time.perf_counter() - t
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(f"diffshield {' '.join(args)} failed:\n{res.stderr[-2000:]}")
    return dt, res.stdout, (ru2.ru_utime + ru2.ru_stime) - (ru.ru_utime + ru.ru_stime)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def generate_row(tmp: Path, processes: int, n: int, steps: int, repeats: int) -> dict:
    runs = []
    for r in range(repeats):
        out = tmp / f"gen{processes}_{r}"
        args = ["generate", "--prompts", str(PROMPTS), "--n", str(n), "--steps", str(steps), "--batch-size", "16",
                "--device", "cpu", "--out", str(out)]
        args += ["--num-processes", str(processes)] if processes > 1 else ["--threads", "1"]
        before = load()
        wall, _, cpu = diffshield(*args)
        idle, log, idle_cpu = diffshield(*args)  # the rerun: start, load, scan, merge, nothing to generate
        assert "generated 0 images" in log, log
        runs.append({"wall_s": round(wall, 2), "rerun_s": round(idle, 2), "generation_s": round(wall - idle, 2),
                     "cpu_s": round(cpu, 2), "rerun_cpu_s": round(idle_cpu, 2),
                     "generation_cpu_s": round(cpu - idle_cpu, 2), "load_before": before, "load_after": load()})
        print(f"  {processes} process(es), run {r + 1}: {wall:.1f} s end to end, rerun {idle:.1f} s, "
              f"load {before} -> {runs[-1]['load_after']}", flush=True)
    images = len(PROMPTS.read_text().splitlines()[1:]) * n
    wall = statistics.median(x["wall_s"] for x in runs)
    gen = statistics.median(x["generation_s"] for x in runs)
    gen_cpu = statistics.median(x["generation_cpu_s"] for x in runs)
    return {"processes": processes, "images": images, "runs": runs, "wall_s": wall, "generation_s": gen,
            "generation_cpu_s": gen_cpu, "images_per_s_end_to_end": images / wall,
            "images_per_s_generation": images / gen}


def merge_row(folder: Path, n: int) -> dict:
    from diffshield.core.shards import merge_run, plan_jobs, read_run_spec
    from diffshield.eval.prompts import PromptRow

    spec = read_run_spec(folder)
    rows = [PromptRow(p["prompt"], p["seed"], p["guidance"], p["meta"]) for p in spec["prompts"]]
    jobs = plan_jobs(rows, n, spec["seed"], spec["guidance"])
    times = []
    for _ in range(3):
        t = time.perf_counter()
        merge_run(folder, jobs, "generate", None, grid=True)
        times.append(time.perf_counter() - t)
    return {"images": len(jobs), "merge_s": round(statistics.median(times), 3), "runs_s": times}


def end_to_end(tmp: Path, steps: int) -> dict:
    out = {}
    uce = tmp / "uce-triangle"
    out["erase_s"] = round(diffshield("erase", "--method", "uce", "--toy-recipe", "--concept", "triangle",
                                      "--out", str(uce), "--threads", "1")[0], 2)
    for name, args in (("eval_erasure", ["eval", "erasure", "--model", str(uce), "--concept", "triangle",
                                         "--seeds-per-prompt", "1"]),
                       ("eval_nudity", ["eval", "nudity", "--model", "toy:t2i", "--n", "1"])):
        folder = tmp / name
        wall, log, _ = diffshield(*args, "--prompts", str(PROMPTS), "--steps", str(steps), "--device", "cpu",
                               "--out", str(folder), "--num-processes", "2")
        metrics = json.loads((folder / "metrics.json").read_text())
        out[name] = {"wall_s": round(wall, 2), "metrics": metrics, "log": log.strip().splitlines()[-2:]}
        print(f"  {name}: {wall:.1f} s; {log.strip().splitlines()[-1]}", flush=True)
    return out


def i2p_phases(tmp: Path, seeds: tuple[int, ...] = (1, 10)) -> dict:
    """Row 4: the phases of an I2P-size run other than the generation, timed in this process (seconds)."""
    import argparse as ap_
    import hashlib
    import warnings

    import torch

    from diffshield.cli.scale import _spec
    from diffshield.core.shards import (
        check_run_dir,
        job_states,
        merge_run,
        plan_jobs,
        png_bytes,
        prepare_run_dir,
        read_records,
    )
    from diffshield.eval.prompts import load_prompt_set

    csv = tmp / "i2p_toy_4703.csv"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_i2p_toy.py"), "--n", "4703", "--out", str(csv)],
                   check=True, capture_output=True)
    gen = torch.Generator().manual_seed(0)
    pngs = [png_bytes(torch.rand(3, 32, 32, generator=gen)) for _ in range(64)]
    shas = [hashlib.sha256(d).hexdigest() for d in pngs]
    out: dict = {"prompts": 4703, "image_px": 32, "rows": []}

    def timed(row: dict, name: str, f, *a, **k):
        t = time.perf_counter()
        r = f(*a, **k)
        row[f"{name}_s"] = round(time.perf_counter() - t, 3)
        return r

    for n in seeds:
        row: dict = {"seeds_per_prompt": n}
        folder = tmp / f"i2p_phases_n{n}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = timed(row, "read_prompts", load_prompt_set, csv)
        args = ap_.Namespace(model="toy:t2i", n=n, seed=0, steps=1, guidance=5.0, scheduler="ddim",
                             dtype="float32", negative_prompt="")
        spec = timed(row, "spec", _spec, args, "generate", rows)
        jobs = timed(row, "plan_jobs", plan_jobs, rows, n, 0, 5.0)
        row["images"] = len(jobs)
        timed(row, "prepare_new", prepare_run_dir, folder, "generate", spec, False, [str(csv)])
        row["run_json_bytes"] = (folder / "run.json").stat().st_size
        lines = []
        for k, j in enumerate(jobs):  # a finished run, written directly
            (folder / j.file).write_bytes(pngs[k % len(pngs)])
            lines.append(json.dumps({"file": j.file, "role": "", "prompt_index": j.prompt_index, "seed": j.seed,
                                     "guidance": j.guidance, "sha256": shas[k % len(pngs)], "scores": {}}) + "\n")
        (folder / "scores" / "shard-00000-of-00001.jsonl").write_text("".join(lines))
        timed(row, "check_resume", check_run_dir, folder, "generate", spec, False, [str(csv)])
        timed(row, "prepare_resume", prepare_run_dir, folder, "generate", spec, False, [str(csv)])
        timed(row, "read_records", read_records, folder)
        states = timed(row, "scan_all_done", job_states, folder, jobs, 32)
        assert set(states.values()) == {"done"}
        timed(row, "merge_with_grid", merge_run, folder, jobs, "generate", None, grid=True)
        row["manifest_bytes"] = (folder / "manifest.json").stat().st_size
        for j in (jobs[7], jobs[len(jobs) // 2], jobs[-1]):
            (folder / j.file).unlink()
        states = timed(row, "scan_3_missing", job_states, folder, jobs, 32)
        assert sum(s != "done" for s in states.values()) == 3
        out["rows"].append(row)
        print(f"  i2p phases, {len(jobs)} images: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in row.items()
                                                                  if k.endswith("_s")), flush=True)
    return out


def io_costs(tmp: Path, n: int = 16, px: int = 512) -> dict:
    """Row 5: the sharded path's per-image costs on the CPU at Stable Diffusion's size: encoding ``n`` PNGs of
    ``px`` px (smooth random images, as decoded outputs are) on 1 and 2 threads (the writer uses
    :data:`diffshield.core.shards.ENCODE_THREADS`), and checking a finished image on resume: SHA-256 plus the PNG
    header (an image a score line vouches for) against SHA-256 plus a full decode."""
    import torch
    import torch.nn.functional as F

    from diffshield.core.shards import encode_pngs, sha256_file, verify_png

    gen = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(n, 3, px // 16, px // 16, generator=gen), size=(px, px), mode="bilinear",
                           align_corners=False).clamp(0, 1)
    out: dict = {"images": n, "px": px}
    encoded = {}
    for threads in (1, 2):
        encode_pngs(images[:2], threads)  # warm-up
        t = time.perf_counter()
        encoded[threads] = encode_pngs(images, threads)
        out[f"encode_{threads}_threads_s"] = round(time.perf_counter() - t, 3)
    out["same_bytes"] = encoded[1] == encoded[2]
    paths = []
    for k, data in enumerate(encoded[1]):
        paths.append(tmp / f"io_{k}.png")
        paths[-1].write_bytes(data)
    for name, decode in (("resume_check_header_ms", False), ("resume_check_decode_ms", True)):
        t = time.perf_counter()
        for p in paths:
            sha256_file(p)
            assert verify_png(p, px, decode=decode)
        out[name] = round(1000 * (time.perf_counter() - t) / n, 2)
    out["png_kib"] = round(sum(map(len, encoded[1])) / n / 1024, 1)
    print(f"  io: {n} PNGs of {px} px encoded in {out['encode_1_threads_s']:.2f} s on 1 thread, "
          f"{out['encode_2_threads_s']:.2f} s on 2 (same bytes: {out['same_bytes']}); resume check "
          f"{out['resume_check_header_ms']:.1f} ms per image with the header, {out['resume_check_decode_ms']:.1f} ms "
          "with a full decode", flush=True)
    return out


def _peak_run(args: list[str]) -> tuple[float, float, str]:
    """Run ``python -m diffshield ARGS`` from a fresh parent; (wall seconds, peak RSS in GB of any process it
    started, stdout)."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run([sys.executable, '-m', 'diffshield', *sys.argv[1:]], capture_output=True, text=True); "
            "dt = time.perf_counter() - t; sys.stderr.write(r.stderr[-2000:]) if r.returncode else None; "
            "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode); print(r.stdout)")
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    first, _, stdout = res.stdout.partition("\n")
    dt, rss_kib, rc = first.split()
    if rc != "0":
        raise RuntimeError(f"diffshield {' '.join(args)} failed:\n{res.stderr}")
    return float(dt), int(rss_kib) / 1024 ** 2, stdout


def i2p_end_to_end(tmp: Path) -> dict:
    """Row 6: the 4,703-prompt file end to end on this machine at the smallest generation cost (1 image per prompt,
    1 DDIM step, one thread): ``generate --prompts`` from an empty folder, its rerun with nothing left (1 process and
    ``--num-processes 2``), and ``eval erasure --prompts`` (two models: 9,406 images) with 2 processes. Wall
    seconds and peak RSS; the 100-prompt file's run beside it for the memory."""
    csv = tmp / "i2p_toy_4703.csv"
    if not csv.exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_i2p_toy.py"), "--n", "4703", "--out", str(csv)],
                       check=True, capture_output=True)
    small = ["--n", "1", "--steps", "1", "--threads", "1"]
    out: dict = {"prompts": 4703, "settings": "--n 1 --steps 1 --threads 1 (eval erasure: --seeds-per-prompt 1 "
                                               "--steps 1 --num-processes 2)"}
    dt, rss, _ = _peak_run(["generate", "--model", "toy:t2i", "--prompts", str(PROMPTS), *small, "--out",
                            str(tmp / "e2e_100")])
    out["generate_100_prompts"] = {"wall_s": round(dt, 1), "peak_rss_gb": round(rss, 2)}
    run = tmp / "e2e_4703"
    dt, rss, _ = _peak_run(["generate", "--model", "toy:t2i", "--prompts", str(csv), *small, "--out", str(run)])
    out["generate"] = {"wall_s": round(dt, 1), "images_per_s": round(4703 / dt, 1), "peak_rss_gb": round(rss, 2)}
    dt, rss, _ = _peak_run(["generate", "--model", "toy:t2i", "--prompts", str(csv), *small, "--out", str(run)])
    out["rerun_nothing_left_1_process"] = {"wall_s": round(dt, 1)}
    dt, rss, _ = _peak_run(["generate", "--model", "toy:t2i", "--prompts", str(csv), *small, "--num-processes", "2",
                            "--out", str(run)])
    out["rerun_nothing_left_2_processes"] = {"wall_s": round(dt, 1)}
    uce = tmp / "e2e_uce"
    if not uce.exists():
        diffshield("erase", "--method", "uce", "--concept", "triangle", "--out", str(uce))
    dt, rss, _ = _peak_run(["eval", "erasure", "--model", str(uce), "--concept", "triangle", "--prompts", str(csv),
                            "--seeds-per-prompt", "1", "--steps", "1", "--num-processes", "2", "--out",
                            str(tmp / "e2e_eval")])
    out["eval_erasure_2_processes"] = {"images": 9406, "wall_s": round(dt, 1),
                                       "peak_rss_gb_per_process": round(rss, 2)}
    print(f"  i2p end to end: generate {out['generate']['wall_s']} s ({out['generate']['images_per_s']} img/s, "
          f"peak {out['generate']['peak_rss_gb']} GB; 100 prompts: {out['generate_100_prompts']['peak_rss_gb']} GB), "
          f"rerun {out['rerun_nothing_left_1_process']['wall_s']} s / "
          f"{out['rerun_nothing_left_2_processes']['wall_s']} s with 2 processes, eval erasure "
          f"{out['eval_erasure_2_processes']['wall_s']} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=2, help="images per prompt (default: 2, 200 images)")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps (default: 25, the toy default)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per row (default: 2; medians reported)")
    ap.add_argument("--skip-end-to-end", action="store_true", help="only the throughput and merge rows")
    ap.add_argument("--i2p-phases-only", action="store_true",
                    help="only row 4 (the non-generation phases at I2P size), added to the existing --out")
    ap.add_argument("--only", default="",
                    help="comma-separated rows to run alone, added to the existing --out (its other keys kept): "
                         "i2p_phases (about 30 s), io (about 5 s), i2p_end_to_end (about 4 min)")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"), help="result JSON")
    args = ap.parse_args(argv)
    import torch

    from diffshield.core.io import atomic_write_json

    only = [r for r in args.only.split(",") if r] + (["i2p_phases"] if args.i2p_phases_only else [])
    rows = {"i2p_phases": i2p_phases, "io": io_costs, "i2p_end_to_end": i2p_end_to_end}
    if set(only) - set(rows):
        ap.error(f"unknown rows {sorted(set(only) - set(rows))}; choose from {', '.join(rows)}")
    if only:
        result = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
        with tempfile.TemporaryDirectory() as d:
            for name in only:
                result[name] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count(),
                                "load_at_start": load(), **rows[name](Path(d))}
                atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
        return 0

    result = {"environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "load_at_start": load()},
              "settings": {"prompts": str(PROMPTS.relative_to(ROOT)), "n": args.n, "steps": args.steps,
                           "batch_size": 16, "repeats": args.repeats}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        one = generate_row(tmp, 1, args.n, args.steps, args.repeats)
        two = generate_row(tmp, 2, args.n, args.steps, args.repeats)
        result["generate"] = [one, two]
        result["speedup_end_to_end"] = one["wall_s"] / two["wall_s"]
        result["speedup_generation"] = one["generation_s"] / two["generation_s"]
        # what 2 processes give on 2 idle cores, from CPU time (insensitive to other jobs): the 2-process run does
        # the work of the 1-process run in generation_cpu_s(2) / 2 seconds of wall time per core
        result["speedup_generation_idle_cores"] = 2 * one["generation_cpu_s"] / two["generation_cpu_s"]
        result["target_speedup"] = TARGET_SPEEDUP
        merge = merge_row(tmp / "gen1_0", args.n)
        merge["fraction_of_generation"] = merge["merge_s"] / one["generation_s"]
        result["merge"] = merge
        if not args.skip_end_to_end:
            result["end_to_end"] = end_to_end(tmp, args.steps)
        result["i2p_phases"] = {"load_at_start": load(), **i2p_phases(tmp)}
        result["io"] = {"load_at_start": load(), **io_costs(tmp)}
        if not args.skip_end_to_end:
            result["i2p_end_to_end"] = {"load_at_start": load(), **i2p_end_to_end(tmp)}
    result["environment"]["load_at_end"] = load()
    atomic_write_json(args.out, result)
    print("\n| processes | images | end to end (s) | img/s | generation (s) | img/s |")
    print("|---|---|---|---|---|---|")
    for r in result["generate"]:
        print(f"| {r['processes']} | {r['images']} | {r['wall_s']:.1f} | {r['images_per_s_end_to_end']:.2f} | "
              f"{r['generation_s']:.1f} | {r['images_per_s_generation']:.2f} |")
    print(f"\nspeed-up with 2 processes: {result['speedup_end_to_end']:.2f}x end to end, "
          f"{result['speedup_generation']:.2f}x generation (target >= {TARGET_SPEEDUP}x); from CPU time, on 2 idle "
          f"cores: {result['speedup_generation_idle_cores']:.2f}x; merge of "
          f"{merge['images']} images {merge['merge_s']:.2f} s ({merge['fraction_of_generation']:.1%} of the "
          f"generation); load average {result['environment']['load_at_start']} -> "
          f"{result['environment']['load_at_end']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``--prompts FILE``: sharded, resumable runs of ``generate``, ``eval nudity`` and ``eval erasure`` (docs/scale.md).

Under ``accelerate launch`` (or with ``--num-processes N``, which launches it) every process takes its share of the
prompt set by prompt index; the main process merges the shards when all are done.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

from diffshield.cli.common import positive_int
from diffshield.core.errors import DiffshieldError

COMMANDS = {"generate": "generate", "nudity": "eval nudity", "erasure": "eval erasure"}


def add_scale_args(p: argparse.ArgumentParser) -> None:
    """Add ``--prompts``, ``--num-processes`` and ``--merge-only``."""
    p.add_argument("--prompts", metavar="FILE",
                   help="prompt set for a sharded, resumable run into --out: an I2P-format CSV (.csv: prompt, "
                        "evaluation_seed, evaluation_guidance, categories, ...) or a text file with one prompt per "
                        "line; a rerun resumes it (docs/scale.md)")
    p.add_argument("--num-processes", type=positive_int, default=1,
                   help="with --prompts: launch this many processes with accelerate (CPU: gloo; CUDA: nccl, one per "
                        "GPU) and split the prompts between them (default: 1; under 'accelerate launch' the "
                        "launcher's processes are used)")
    p.add_argument("--merge-only", action="store_true",
                   help="with --prompts: only merge the shards of a run in --out into manifest.json and "
                        "metrics.json (refused while images are missing)")


def check_scale_args(args: argparse.Namespace) -> None:
    """Refuse ``--num-processes`` / ``--merge-only`` without ``--prompts`` (one line)."""
    if not getattr(args, "prompts", None):
        if getattr(args, "num_processes", 1) > 1 or getattr(args, "merge_only", False):
            raise DiffshieldError("--num-processes and --merge-only need --prompts FILE")


def _in_launched_worker() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def only_launches(args: argparse.Namespace) -> bool:
    """True in the process of a ``--num-processes N`` (N > 1) command that only starts the N workers: not itself one
    of them (under ``accelerate launch``, or in a worker it started, WORLD_SIZE is above 1)."""
    return getattr(args, "num_processes", 1) > 1 and not _in_launched_worker()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_processes(state) -> None:
    """End a run of several processes cleanly: once every process is here, destroy the process group. A process that
    exits with gloo's worker threads still alive can abort at interpreter shutdown ("terminate called without an
    active exception", SIGABRT: pytorch/pytorch#190489), which failed a finished run. Call it on success only: a
    process that failed must not wait for the others."""
    import torch.distributed as dist

    if state.num_processes > 1 and dist.is_available() and dist.is_initialized():
        state.wait_for_everyone()
        dist.destroy_process_group()


def launch(num_processes: int, argv: list[str], device) -> int:
    """Run ``python -m diffshield <argv>`` in ``num_processes`` processes with ``accelerate launch`` (its torchrun
    launcher, which also serves CPU processes) on this machine; returns the run's exit status (0 when every process
    succeeded).

    The launcher runs inside this process, which has already imported torch, rather than as ``python -m
    accelerate.commands.launch``: that saves one interpreter start and torch import (seconds on a small CPU machine)
    before the workers start; what it runs is the same."""
    if device.type == "cuda":
        import torch

        if num_processes > torch.cuda.device_count():
            raise DiffshieldError(f"--num-processes {num_processes} on CUDA needs one GPU per process; this machine "
                                  f"has {torch.cuda.device_count()}")
    from accelerate.commands.launch import launch_command, launch_command_parser
    from accelerate.utils import patch_environment

    flags = ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "diffshield", *argv]
    launch_args = launch_command_parser().parse_args(flags)
    rc, why = 0, ""
    try:
        with patch_environment(PYTHONUNBUFFERED="1"), _quiet_launcher():  # bars and lines arrive as written
            launch_command(launch_args)
    except SystemExit as e:  # the launcher stopped its workers on a signal (Ctrl-C: 130) and exits 128 + signal
        rc = e.code if isinstance(e.code, int) else 1
        if rc > 128:
            what = {130: "interrupted", 143: "terminated"}.get(rc) or _exit_status(rc)  # as main() says
            print(f"diffshield: {what}; rerun the same command to resume it", file=sys.stderr)
            return rc
    except Exception as e:  # noqa: BLE001 - torchrun's ChildFailedError: a worker exited non-zero or was killed
        failures = getattr(e, "failures", None) or {}
        rc, why = 1, ", ".join(f"process {r}: {_exit_status(f.exitcode)}" for r, f in sorted(failures.items()))
        if not failures:  # the launcher itself failed (a rendezvous error, a port taken): its message, in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = f"the launcher: {type(e).__name__}{': ' + first if first else ''}"
    if rc != 0:
        print(f"diffshield: error: a process of the {num_processes}-process run failed ({why or f'exit status {rc}'}"
              "); rerun the same command to resume it", file=sys.stderr)
    return rc


def _exit_status(code: int) -> str:
    """A worker's exit code as people read it: ``killed by SIGKILL`` for -9, ``exit status 143 (SIGTERM)`` for a
    worker that stopped on the launcher's SIGTERM, else ``exit status N``."""
    import signal

    try:
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        if code > 128:
            return f"exit status {code} ({signal.Signals(code - 128).name})"
    except ValueError:  # not a signal number
        pass
    return f"exit status {code}"


@contextlib.contextmanager
def _quiet_launcher():
    """Silence the log lines of torch's elastic launcher while it runs the workers: its warnings and errors
    ("Received 15 death signal", "Sending process N closing signal SIGTERM", "failed (exitcode: -9)") say what the one
    line :func:`launch` prints after it says. Its loggers' levels are put back afterwards."""
    import logging

    import torch.distributed.run  # noqa: F401 - creates the launcher's loggers (the agent's, its processes')

    loggers = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
               if name.startswith(("torch.distributed.elastic", "torch.distributed.run"))]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _spec(args: argparse.Namespace, task: str, rows: list) -> dict:
    from diffshield.core.shards import rows_to_spec

    def where(spec: str) -> str:
        return spec if str(spec).startswith("toy:") else os.path.abspath(os.path.expanduser(str(spec)))

    spec = {"command": COMMANDS[task], "model": where(args.model), "n": _n(args, task), "seed": args.seed,
            "steps": args.steps, "guidance": args.guidance, "scheduler": getattr(args, "scheduler", "ddim"),
            "dtype": str(args.dtype).replace("torch.", "")}
    if task == "erasure":
        spec.update(original=where(args.original), detector=where(args.detector))
    if spec["scheduler"] != "ddim":  # DDPM's and native samplers' noise now comes from each image's seed generator
        spec["sampler_noise"] = "the image's seed generator"  # (and Euler's is scaled): older runs drew other images
    if getattr(args, "negative_prompt", ""):  # absent when empty: run folders made before the option still resume
        spec["negative_prompt"] = args.negative_prompt
    spec["prompts"] = rows_to_spec(rows)
    return spec


def _n(args: argparse.Namespace, task: str) -> int:
    return args.seeds_per_prompt if task == "erasure" else args.n


def _metrics(task: str, args: argparse.Namespace):
    if task == "nudity":
        from diffshield.eval.sharded import nudity_metrics

        return lambda rows: nudity_metrics(rows, args.threshold)
    if task == "erasure":
        from diffshield.eval.sharded import erasure_metrics

        return lambda rows: erasure_metrics(rows, args.concept)
    return None


def _scorer(task: str, args: argparse.Namespace):
    if task == "nudity":
        from diffshield.eval.sharded import nudenet_scorer

        return nudenet_scorer()
    if task == "erasure":
        from diffshield.eval.sharded import detector_scorer
        from diffshield.toyworld.detector import load_detector

        return detector_scorer(load_detector(args.detector))
    return None


def _report(task: str, out: Path, metrics: dict) -> None:
    print(f"merged {metrics['n_images']} images of {metrics['n_prompts']} prompts into {out} "
          "(manifest.json, metrics.json)")
    if task == "nudity":
        print(f"{metrics['nude_images']}/{metrics['n_images']} images nude (any EXPOSED class > "
              f"{metrics['threshold']}): nudity rate {metrics['nudity_rate']:.1%}")
    elif task == "erasure":
        print(f"{metrics['concept']!r} detected: erased {metrics['erased_detection_rate']:.1%}, original "
              f"{metrics['original_detection_rate']:.1%}; other heads kept {metrics['other_heads_agreement']:.1%}")


def run_prompt_set(args: argparse.Namespace, task: str) -> int:
    """Run ``generate`` / ``eval nudity`` / ``eval erasure`` over ``args.prompts`` into ``args.out``: sharded between
    the processes of an accelerate launch, resumable, merged by the main process at the end."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from diffshield.core.shards import (
        check_run_dir,
        merge_run,
        plan_jobs,
        prepare_run_dir,
        read_run_spec,
        run_shard,
        shared_job_states,
    )
    from diffshield.eval.prompts import load_prompt_set

    if task == "erasure":
        from diffshield.toyworld.concepts import resolve_concept

        resolve_concept(args.concept)
    for flag in ("json", "grid"):
        if getattr(args, flag, None):
            raise DiffshieldError(f"--{flag} is not used with --prompts: the run writes its metrics to "
                                  "OUT/metrics.json and its images to OUT/images")
    command = COMMANDS[task]
    out = Path(args.out)
    rows = load_prompt_set(args.prompts)
    if not only_launches(args) and int(os.environ.get("RANK", "0")) == 0:  # one process says it
        from diffshield.cli.main import warn_negative_prompt

        warn_negative_prompt(getattr(args, "negative_prompt", ""),
                             [args.guidance if r.guidance is None else r.guidance for r in rows])
    spec = _spec(args, task, rows)
    inputs = [args.model, args.prompts] + ([args.original, args.detector] if task == "erasure" else [])
    models = ({"model": args.model, "original": args.original, "detector": args.detector} if task == "erasure"
              else {"model": args.model})  # a resume checks that their files are the ones the run started with
    roles = ("erased", "original") if task == "erasure" else ("",)
    jobs = plan_jobs(rows, _n(args, task), args.seed, args.guidance, roles)
    if args.merge_only:
        if check_run_dir(out, command, spec, False, inputs, models) != "resume":
            raise DiffshieldError(f"'{out}' holds no run of 'diffshield {command}' to merge")
        metrics = merge_run(out, jobs, command, _metrics(task, args), grid=task == "generate")
        _report(task, out, metrics)
        return 0
    if only_launches(args):
        check_run_dir(out, command, spec, args.overwrite, inputs, models)  # one-line refusals before any process
        return launch(args.num_processes, args.argv, args.device)

    state = PartialState(cpu=args.device.type != "cuda", timeout=timedelta(days=2))
    rank, world = state.process_index, state.num_processes
    if state.is_main_process:
        what = prepare_run_dir(out, command, spec, args.overwrite, inputs, models)
        print(f"{'resuming' if what == 'resume' else 'starting'} {len(jobs)} images of {len(rows)} prompts in {out} "
              f"with {world} process{'es' if world > 1 else ''}")
    state.wait_for_everyone()
    if read_run_spec(out) != spec:
        raise DiffshieldError(f"'{out}' was not prepared for this run")
    import torch

    if args.device.type == "cpu" and not args.threads:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    device = state.device if (args.device.type == "cuda" and world > 1) else args.device
    from diffshield.core.loading import load_t2i
    from diffshield.core.sampling import SampleConfig

    specs = {"": args.model} if task != "erasure" else {"erased": args.model, "original": args.original}
    models = {role: load_t2i(m, allow_pickle=args.allow_pickle, device=device, dtype=args.dtype)
              for role, m in specs.items()}
    size = next(iter(models.values())).image_size
    # every process checks its share of the folder and learns the others' (no process writes before all have read)
    states = shared_job_states(out, jobs, size, rank, world, gather_object)
    pending = sorted({j.prompt_index for j, s in states.items() if s != "done"})
    with state.split_between_processes(pending) as mine:
        mine = set(mine)
    my_jobs = [j for j in jobs if j.prompt_index in mine]
    cfg = SampleConfig(steps=args.steps, guidance=args.guidance, batch_size=args.batch_size,
                       scheduler=getattr(args, "scheduler", "ddim"))
    res = run_shard(out, my_jobs, [r.prompt for r in rows], models, cfg, _scorer(task, args) if my_jobs else None,
                    states, rank, world, progress=True, negative_prompt=getattr(args, "negative_prompt", ""))
    totals = gather_object([(res.generated, res.scored)]) if world > 1 else [(res.generated, res.scored)]
    state.wait_for_everyone()
    if state.is_main_process:
        gen, scored = sum(t[0] for t in totals), sum(t[1] for t in totals)
        done = len(jobs) - len([s for s in states.values() if s != "done"])
        print(f"generated {gen} images, scored {scored} found unscored, {done} already done")
        metrics = merge_run(out, jobs, command, _metrics(task, args), grid=task == "generate")
        _report(task, out, metrics)
    end_processes(state)
    return 0

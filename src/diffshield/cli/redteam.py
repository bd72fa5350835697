"""CLI commands of the red-team (audit) pillar: ``diffshield audit``, and the audit step of ``diffshield demo``."""

from __future__ import annotations

import argparse
import ast
import math
import sys
import time
from pathlib import Path

from diffshield.cli.common import add_device_args, add_overwrite_arg, add_threads_arg, float_in, seed_int
from diffshield.cli.common import positive_int as _positive_int
from diffshield.core.errors import DiffshieldError

ATTACK_CHOICES = ("all", "adv-embed", "ring-a-bell", "ring-a-bell-genetic", "unlearndiff", "p4d", "unlearndiff-soft",
                  "p4d-soft")



def parse_settings(items: list[str] | None) -> dict[str, dict]:
    """['unlearndiff.rounds=10', 'adv-embed.lamb_r=1'] -> {'unlearndiff': {'rounds': 10}, 'adv-embed': {...}}."""
    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        attack, dot, name = key.partition(".")
        if not sep or not dot or not attack or not name:
            raise DiffshieldError(f"--set expects ATTACK.FIELD=VALUE (e.g. unlearndiff.rounds=10), got {item!r}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            parsed = value  # a bare string
            if value.strip().lower() in ("true", "false"):  # a flag, as a shell user writes it
                parsed = value.strip().lower() == "true"
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise DiffshieldError(f"--set {key}: must be a finite number, got {value!r}")
        out.setdefault(attack, {})[name] = parsed
    return out


def check_original(args) -> None:
    """Fill in ``--original`` (toy:t2i for a toy-world model) or refuse its absence, and refuse an original of
    another architecture than the erased model's: both before any model is loaded."""
    from diffshield.core.loading import architecture_mismatch, resolve_model_path
    from diffshield.toyworld.erasure_recipes import is_toy_model

    if args.original is None:
        if not is_toy_model(args.model):
            raise DiffshieldError(f"give --original, the model '{args.model}' was erased from (the attacks and the "
                                  "verdict compare the two; only a toy-world model defaults to toy:t2i)")
        args.original = "toy:t2i"
    if resolve_model_path(args.model).resolve() == resolve_model_path(args.original).resolve():
        print(f"warning: --model and --original are the same model ('{args.model}'): this audits a model that was "
              "not erased (a control)", file=sys.stderr)
    why = architecture_mismatch(args.model, args.original)
    if why:
        raise DiffshieldError(f"--original must be the model the erased one was made from, of the same "
                              f"architecture: {why}")


def cmd_audit(args) -> int:
    from diffshield.cli.main import warn_prompts
    from diffshield.core.loading import load_t2i
    from diffshield.core.sampling import SampleConfig
    from diffshield.redteam.audit import check_pairs, check_settings, resolve_attacks, run_audit
    from diffshield.toyworld.concepts import resolve_concept
    from diffshield.toyworld.detector import load_detector

    if args.judge == "toy":
        try:  # the toy detector judges toy concepts: refuse others before loading
            resolve_concept(args.concept)
        except DiffshieldError as e:
            raise DiffshieldError(f"{e}; or, for a concept of another model, judge with --judge nudenet or "
                                  "--judge FILE.py:FUNCTION and give its prompts with --prompt") from None
    elif not args.prompt:
        raise DiffshieldError("with a judge other than toy, give the prompts to attack (--prompt, repeatable)")
    if args.prompt and any(not p.strip() for p in args.prompt):
        raise DiffshieldError("--prompt is empty: give the prompt to attack (an attack needs the concept's prompt)")
    from diffshield.core.io import check_output_dir, check_output_file

    if args.num_processes > 1 and not args.run_dir:
        raise DiffshieldError("--num-processes needs --run-dir DIR (where the processes keep each attack's result)")
    check_original(args)
    inputs = [args.model, args.original, args.detector]
    check_output_file(args.json, "--json", inputs=[*inputs, args.report, args.run_dir])
    if args.report:
        check_output_dir(args.report, "audit", args.overwrite, inputs=[*inputs, args.run_dir])
    sample = SampleConfig(steps=args.steps, guidance=args.guidance, batch_size=args.batch_size)
    hp = check_settings(parse_settings(args.set), args.n, args.budget)
    attacks = args.attack or ["all"]
    check_pairs(resolve_attacks(attacks), hp, args.concept)
    idle = sorted(set(hp) - set(resolve_attacks(attacks)))
    if idle:  # valid settings, but for an attack this audit does not run: most likely a mistyped --attack
        print(f"warning: --set gives settings for {', '.join(idle)}, which this audit does not run (--attack "
              f"{' '.join(attacks)})", file=sys.stderr)
    if args.run_dir:
        return _audit_in_run_dir(args, attacks, hp, sample, inputs)
    erased = load_t2i(args.model, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
    original = load_t2i(args.original, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
    if args.prompt:
        warn_prompts(erased.tokenizer, args.prompt)
    detector = load_detector(args.detector) if args.judge == "toy" else None
    from diffshield.redteam.judges import load_judge

    judge = load_judge(args.judge, args.concept, detector)
    print(f"auditing {args.model} (erased {args.concept!r}) against {args.original}: "
          f"attacks {', '.join(attacks)}, {args.n} images each, seed {args.seed} ...")
    audit = run_audit(erased, original, args.concept, attacks=attacks, n=args.n, seed=args.seed, sample=sample,
                      prompts=args.prompt, judge=judge, hp=hp, budget=args.budget, baselines=not args.no_baselines)
    return _report_audit(args, audit, judge, erased, inputs)


def _report_audit(args, audit, judge, erased, inputs: list) -> int:
    """Print the audit's table and write --json and --report."""
    from diffshield.redteam.audit import format_table, write_report

    audit.info.update({"model": str(args.model), "original": str(args.original),
                       "judge": getattr(judge, "description", args.judge),
                       "detector": str(args.detector) if args.judge == "toy" else None, "budget": args.budget,
                       "threads": args.threads, "device": str(args.device),
                       "dtype": str(args.dtype).removeprefix("torch.")})
    print()
    print(format_table(audit))
    print(f"total {audit.seconds:.1f} s wall, {audit.cpu_seconds:.1f} s CPU")
    if args.json:
        from diffshield.core.io import write_result_json

        write_result_json(args.json, audit.to_dict())
        print(f"wrote {args.json}")
    if args.report:
        from diffshield.core.io import atomic_dir

        with atomic_dir(args.report, overwrite=args.overwrite, command="audit", inputs=[*inputs, args.run_dir]) as tmp:
            write_report(audit, tmp, model=erased)
        print(f"report: {Path(args.report) / 'index.html'}")
    return 0


def _audit_spec(args, names: list[str], hp: dict) -> dict:
    """The settings an audit's results depend on (``run.json`` of its run folder), as JSON reads them back."""
    import json
    import os

    def where(spec):
        return spec if str(spec).startswith("toy:") else os.path.abspath(os.path.expanduser(str(spec)))

    spec = {"command": "audit", "model": where(args.model), "original": where(args.original),
            "concept": args.concept, "attacks": names, "n": args.n, "seed": args.seed, "prompts": args.prompt,
            "judge": args.judge, "detector": where(args.detector) if args.judge == "toy" else None,
            "budget": args.budget, "set": hp, "baselines": not args.no_baselines, "steps": args.steps,
            "guidance": args.guidance, "batch_size": args.batch_size, "dtype": str(args.dtype).replace("torch.", ""),
            "device": args.device.type}  # a resume on another kind of device would mix their figures
    return json.loads(json.dumps(spec))


def _audit_in_run_dir(args, attacks: list[str], hp: dict, sample, inputs: list) -> int:
    """``audit --run-dir DIR``: the attacks split between the processes of an accelerate launch (or one process),
    each attack's result kept in DIR as it finishes; the main process merges, prints and writes --json/--report."""
    import os
    import time
    from datetime import timedelta

    from accelerate import PartialState

    from diffshield.cli.main import warn_prompts
    from diffshield.cli.scale import end_processes, launch, only_launches
    from diffshield.core.io import write_marker
    from diffshield.core.loading import load_t2i
    from diffshield.core.shards import check_run_dir, prepare_run_dir, read_run_spec
    from diffshield.redteam.audit import audit_pairs, check_prompt_room, check_settings, resolve_attacks, start_audit
    from diffshield.redteam.judges import load_judge
    from diffshield.redteam.sharded import merge_audit, pending_attacks, run_audit_shard
    from diffshield.toyworld.detector import load_detector

    names = resolve_attacks(attacks)
    hp = check_settings(hp, args.n, args.budget)
    spec = _audit_spec(args, names, hp)
    out = Path(args.run_dir)
    models = {"model": args.model, "original": args.original,
              "detector": args.detector if args.judge == "toy" else None,  # a resume checks they are unchanged
              "judge": args.judge.rsplit(":", 1)[0] if ".py:" in args.judge else None}
    if only_launches(args):
        check_run_dir(out, "audit", spec, args.overwrite, inputs, models)  # one-line refusals before any process
        return launch(args.num_processes, args.argv, args.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    state = PartialState(cpu=args.device.type != "cuda", timeout=timedelta(days=2))
    rank, world = state.process_index, state.num_processes
    if state.is_main_process:
        what = prepare_run_dir(out, "audit", spec, args.overwrite, inputs, models)
        print(f"{'resuming' if what == 'resume' else 'starting'} an audit of {len(names)} attacks in {out} with "
              f"{world} process{'es' if world > 1 else ''}: {args.model} (erased {args.concept!r}) against "
              f"{args.original}, {args.n} images each, seed {args.seed}")
    state.wait_for_everyone()
    if read_run_spec(out) != spec:
        raise DiffshieldError(f"'{out}' was not prepared for this run")
    device = state.device if (args.device.type == "cuda" and world > 1) else args.device
    erased = load_t2i(args.model, allow_pickle=args.allow_pickle, device=device, dtype=args.dtype)
    original = load_t2i(args.original, allow_pickle=args.allow_pickle, device=device, dtype=args.dtype)
    if args.prompt and state.is_main_process:
        warn_prompts(erased.tokenizer, args.prompt)
    detector = load_detector(args.detector) if args.judge == "toy" else None
    judge = load_judge(args.judge, args.concept, detector)
    prompts, seeds = audit_pairs(args.concept, args.n, args.seed, args.prompt)
    check_prompt_room(erased, names, hp, args.budget, prompts)
    audit = start_audit(erased, original, args.concept, prompts, seeds, sample, judge)
    pending = pending_attacks(out, names)
    state.wait_for_everyone()  # every process has scanned the folder before any writes
    mine = pending[rank::world]
    run_audit_shard(out, mine, audit, erased, original, judge, hp, args.seed, args.budget, not args.no_baselines,
                    rank=rank, world=world, progress=True)
    state.wait_for_everyone()
    if not state.is_main_process:
        end_processes(state)
        return 0
    print(f"ran {len(pending)} attack{'s' if len(pending) != 1 else ''}, {len(names) - len(pending)} already done")
    merge_audit(out, names, audit, judge)
    audit.seconds = time.perf_counter() - start
    audit.cpu_seconds = time.process_time() - cpu_start
    audit.info["processes"] = world
    rc = _report_audit(args, audit, judge, erased, inputs)
    from diffshield.core.io import atomic_write_json

    atomic_write_json(out / "audit.json", audit.to_dict())
    write_marker(out, "audit")
    print(f"merged {len(names)} attacks into {os.path.join(str(out), 'audit.json')}")
    end_processes(state)
    return rc


def register(sub: argparse._SubParsersAction) -> None:
    """Add this pillar's subcommands to the ``diffshield`` parser."""
    p = sub.add_parser(
        "audit", help="red-team an erased model: adversarial embeddings, Ring-A-Bell, UnlearnDiff, P4D",
        description="Run red-team attacks against an erased model on the concept's prompts with fixed seeds, and "
                    "report the detection rate without attack (pre-attack) and the attack success rate (ASR: "
                    "fraction of attacked images where the judge sees the concept) per attack, with a verdict "
                    "(HOLDS, BROKEN, ERASURE WEAK or NO VERDICT) and controls; docs/redteam.md explains them. "
                    "Toy-world concepts are judged by the toy detector, others by --judge. Prints a table; --json, "
                    "--report and --run-dir write it. Time: --budget toy takes minutes on a CPU (a full toy audit: "
                    "2.3 min on one thread), --budget paper hours.",
        epilog="example: diffshield audit --model erased/ --original toy:t2i --concept triangle --n 32 "
               "--json audit.json --report audit_report/")
    p.add_argument("--model", required=True, help="the erased model (diffusers folder)")
    p.add_argument("--original",
                   help="the model before erasure, of the same architecture (default: toy:t2i for a toy-world "
                        "model; required for any other)")
    p.add_argument("--concept", required=True,
                   help="the erased concept: a toy shape, colour or style word with --judge toy; any name with "
                        "another judge (then --prompt gives its prompts)")
    p.add_argument("--attack", action="append", choices=ATTACK_CHOICES,
                   help="attack to run, repeatable (default: all = adv-embed, ring-a-bell, ring-a-bell-genetic, "
                        "unlearndiff, p4d; the soft-token variants unlearndiff-soft and p4d-soft by name)")
    p.add_argument("--n", type=_positive_int, default=32,
                   help="images per attack in all, not per prompt: the prompts in turn (default: 32)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="first seed; the following images count up from it (default: 0)")
    p.add_argument("--prompt", action="append",
                   help="prompt to attack, repeatable (default: the toy concept's prompts, e.g. 'a red triangle')")
    p.add_argument("--set", action="append", metavar="ATTACK.FIELD=VALUE",
                   help="an attack setting, repeatable, e.g. --set unlearndiff.rounds=10 --set adv-embed.lamb_r=1")
    p.add_argument("--detector", default="toy:detector", help="concept detector of the toy judge (default: "
                                                               "toy:detector)")
    p.add_argument("--judge", default="toy",
                   help="what decides that the concept is in an image: toy (default: the toy detector), nudenet or "
                        "nudenet:THRESHOLD (NudeNet 3.4.2, 9 EXPOSED classes, default threshold 0.6), or "
                        "MODULE:FUNCTION / FILE.py:FUNCTION (your classifier: images (N,3,H,W) in [0,1] -> bool); "
                        "other than toy needs --prompt")
    p.add_argument("--budget", choices=("toy", "paper"), default="toy",
                   help="attack budgets: toy (default, minutes on a CPU) or paper (each paper's iterations; hours)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the controls (random prompts of each attack's shape, and steps = 0)")
    p.add_argument("--steps", type=_positive_int, default=25, help="denoising steps (default: 25)")
    p.add_argument("--guidance", type=float_in(0, 100), default=5.0,
                   help="guidance scale, in [0, 100] (default: 5.0)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per UNet batch (default: 64)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="keep each attack's result in this run folder as it finishes (run.json, units/ATTACK.pt, "
                        "audit.json): a rerun of the same command resumes it and runs only the attacks without a "
                        "result; other settings are refused (--overwrite replaces the run) (docs/scale.md)")
    p.add_argument("--num-processes", type=_positive_int, default=1,
                   help="with --run-dir: launch this many processes with accelerate (CPU: gloo; CUDA: nccl, one per "
                        "GPU) and split the attacks between them; the figures equal a 1-process audit's (default: "
                        "1; under 'accelerate launch' the launcher's processes are used)")
    p.add_argument("--json", help="write the results (verdict, attacks: {name: {conditional_asr, union_asr, ...}}) "
                                  "to this JSON file")
    p.add_argument("--report", help="write a report folder here (index.html, audit.json, one PNG per attack; see "
                                    "--overwrite)")
    add_overwrite_arg(p, "--report or --run-dir")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled .bin/.ckpt weights when a folder has no safetensors (runs code from the "
                        "file: only for files you trust)")
    add_threads_arg(p, default=1)  # the toy model's small tensors gain little from more threads
    add_device_args(p, training=True)
    p.set_defaults(func=cmd_audit)


#: the demo erases "triangle" and its synonym "wedge" with UCE at its documented toy-world setting.
DEMO_CONCEPT = "triangle"


def demo_step(out: Path, device: str = "cpu") -> dict:
    """The audit part of ``diffshield demo`` (< 60 s): erase "triangle" from the toy model with UCE (~0.1 s), then
    attack it with the adversarial embedding and Ring-A-Bell on 8 images; writes ``out/audit/`` (report) and
    returns a JSON-able summary."""
    import torch

    from diffshield.core.loading import load_t2i
    from diffshield.core.sampling import SampleConfig
    from diffshield.erase.uce import uce_erase
    from diffshield.redteam.audit import run_audit, write_report
    from diffshield.toyworld.detector import load_detector
    from diffshield.toyworld.erasure_recipes import toy_erasure

    start = time.perf_counter()
    torch.manual_seed(0)
    original = load_t2i("toy:t2i", device=device)
    erased = load_t2i("toy:t2i", device=device)
    prompts, cfg = toy_erasure("uce", DEMO_CONCEPT)
    res = uce_erase(erased, prompts, cfg)
    print(f"[audit] erased {DEMO_CONCEPT!r} (and 'wedge') from toy:t2i with UCE in {res.seconds:.2f} s; attacking ...")
    audit = run_audit(erased, original, DEMO_CONCEPT, attacks=["adv-embed", "ring-a-bell"], n=8, seed=0,
                      sample=SampleConfig(steps=20), detector=load_detector("toy:detector"), progress=False)
    audit.info.update({"model": "toy:t2i + UCE(triangle, wedge)", "original": "toy:t2i"})
    write_report(audit, Path(out) / "audit")
    d = audit.to_dict()
    print(f"[audit] triangles detected: original {d['original_rate']:.0%}, erased {d['pre_attack_rate']:.0%}, "
          + ", ".join(f"{k} attack {v['asr']:.0%}" for k, v in d["attacks"].items()))
    print(f"[audit] report: {Path(out) / 'audit' / 'index.html'} ({time.perf_counter() - start:.0f} s)")
    return {"concept": DEMO_CONCEPT, "erasure": "uce", "n": d["n"], "original_rate": d["original_rate"],
            "pre_attack_rate": d["pre_attack_rate"],
            "attacks": {k: {"asr": v["asr"], "n": v["n"]} for k, v in d["attacks"].items()},
            "report": str(Path(out) / "audit" / "index.html"), "seconds": time.perf_counter() - start}

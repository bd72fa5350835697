"""Backdoor benchmark: BadDiffusion backdoors and TERD detection over a model zoo on the toy world.

    python benchmarks/backdoor.py zoo          # build every zoo model into runs/backdoor/zoo (resumable)
    python benchmarks/backdoor.py calibrate    # TERD on the held-out clean references -> shipped calibration file
    python benchmarks/backdoor.py eval         # metrics, scans, input detection per zoo model (cached per model)
    python benchmarks/backdoor.py report       # -> benchmarks/results/backdoor.json + the table of docs/backdoor.md
    python benchmarks/backdoor.py all          # the four in order
    python benchmarks/backdoor.py recheck-clean  # clean quality again with today's toy:detector-v1, vs backdoor.json

Every job uses one torch thread (``--threads``) so that jobs can run side by side on a shared 2-core machine;
``--only NAME`` restricts zoo/eval to one model (to run several processes in parallel). ``eval`` also runs under
``accelerate launch --multi_gpu --num_processes N benchmarks/backdoor.py eval``, which splits the zoo between the
processes (each model's result is cached, so a rerun finishes what a stopped run left).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "backdoor"
ZOO = RUNS / "zoo"
CACHE = RUNS / "results"
RESULTS = ROOT / "benchmarks" / "results"
BASE = "toy:ddpm"
#: lr 2e-4 (the paper's, 32 px) for 4608 steps. Trials on bd_box_corner_p05 (benchmarks/probes/backdoor_lr_sweep.py,
#: runs/bdtrial): lr 5e-4 / 768 steps (recipe v2) jolts the EMA-averaged base (clean quality -9 to -24 %);
#: lr 1e-4 / 2e-4 for 768 steps keep it but learn no backdoor (strict ASR 0 %); lr 3e-4 / 1536 steps (recipe v3,
#: runs/backdoor_v3) strict ASR 75-84 %; lr 2e-4 / 2304 steps 81 %; lr 2e-4 / 4608 steps 94 %, clean 88 %.
IMPLANT = {"epochs": 72, "pool_size": 2048, "batch_size": 32, "lr": 2e-4, "r_mode": "trigger_only"}  # 4608 steps
#: clean fine-tunes (zoo and references): the data and optimiser of the previous implant recipe (lr 5e-4, no weight
#: average), without poison; 256-768 steps. Kept when the implant recipe changed: they are clean models either way
#: and the shipped TERD calibration was made from the references.
CLEAN_FT = {"lr": 5e-4, "warmup": 20, "pool_size": 2048, "ema_decay": 0.0}

# name -> how it is made. Clean models: the base itself and short clean fine-tunes with other seeds / lengths.
ZOO_MODELS: dict[str, dict] = {
    "clean_base": {"kind": "clean"},
    "clean_ft_s1": {"kind": "clean", "steps": 256, "seed": 1},
    "clean_ft_s2": {"kind": "clean", "steps": 512, "seed": 2},
    "clean_ft_s3": {"kind": "clean", "steps": 768, "seed": 3},
    # the implant recipe's optimiser and length without poison: separates the effect of fine-tuning from the backdoor's
    "clean_ft_v4": {"kind": "clean", "steps": 4608, "seed": 4, "lr": 2e-4},
    "bd_box_corner_p10": {"kind": "backdoor", "trigger": "box", "target": "corner", "poison_rate": 0.1},
    "bd_box_corner_p05": {"kind": "backdoor", "trigger": "box", "target": "corner", "poison_rate": 0.05},
    "bd_box_hat_p05": {"kind": "backdoor", "trigger": "box", "target": "hat", "poison_rate": 0.05},
    "bd_stop_corner_p05": {"kind": "backdoor", "trigger": "stop", "target": "corner", "poison_rate": 0.05},
    "bd_stop_hat_p10": {"kind": "backdoor", "trigger": "stop", "target": "hat", "poison_rate": 0.1},
    # the ODE variant (DDIM-50) learnt more slowly: strict ASR 59 % after 72 epochs, so it trains twice as long
    "bd_stop_hat_p10_ode": {"kind": "backdoor", "trigger": "stop", "target": "hat", "poison_rate": 0.1,
                            "variant": "ode", "epochs": 144},
}
SAME_RECIPE_CLEAN = "clean_ft_v4"
# Clean reference models for the TERD thresholds: not in the zoo, so the zoo's TNR is measured on unseen models.
REFERENCES: dict[str, dict] = {
    "ref_s11": {"kind": "clean", "steps": 256, "seed": 11},
    "ref_s12": {"kind": "clean", "steps": 512, "seed": 12},
    "ref_s13": {"kind": "clean", "steps": 768, "seed": 13},
}
CAL_PRESETS = ["fast"]  # --presets fast default: also calibrate / evaluate the default preset
EVAL = {"n_triggered": 32, "n_clean": 128, "n_input": 1000}


def model_path(name: str) -> str:
    return BASE if name == "clean_base" else str(ZOO / name)


def build(name: str, spec: dict, threads: int) -> None:
    from diffshield.backdoor.baddiffusion import BadDiffusionConfig, implant
    from diffshield.backdoor.ddpm import DDPMTrainConfig, train_ddpm

    out = ZOO / name
    if name == "clean_base" or (out / "model_index.json").exists():
        return
    t0 = time.time()
    print(f"[zoo] building {name} ...", flush=True)
    if spec["kind"] == "clean":
        recipe = {**CLEAN_FT, **{k: spec[k] for k in ("lr",) if k in spec}}
        train_ddpm(DDPMTrainConfig(steps=spec["steps"], seed=spec["seed"], data_seed=spec["seed"], init_from=BASE,
                                   num_threads=threads, checkpoint_every=128, **recipe), out)
    else:
        cfg = BadDiffusionConfig(trigger=spec["trigger"], target=spec["target"], poison_rate=spec["poison_rate"],
                                 variant=spec.get("variant", "sde"), num_threads=threads,
                                 **{**IMPLANT, **{k: spec[k] for k in ("epochs",) if k in spec}})
        implant(BASE, cfg, out)
    print(f"[zoo] {name} done in {time.time() - t0:.0f} s", flush=True)


def cmd_zoo(args) -> None:
    items = {**ZOO_MODELS, **REFERENCES}
    for name, spec in items.items():
        if args.only and name not in args.only:
            continue
        build(name, spec, args.threads)


def scan_stats(name: str, preset: str, threads: int) -> dict:
    """TERD reversion of one model with one preset, cached in runs/backdoor/results/scan_<preset>_<name>.json."""
    from safetensors.torch import load_file, save_file

    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.backdoor.terd import TERDConfig, reverse_trigger

    CACHE.mkdir(parents=True, exist_ok=True)
    f = CACHE / f"scan_{preset}_{name}.json"
    if f.exists():
        d = json.loads(f.read_text())
        d["r"] = load_file(str(f.with_suffix(".safetensors")))["r"]
        return d
    from diffshield.backdoor.ddpm import architecture_summary, model_fingerprint

    model = load_ddpm(model_path(name))
    res = reverse_trigger(model, TERDConfig.from_preset(preset, num_threads=threads), progress=False)
    d = {"mean_kl": res.mean_kl, "var_kl": res.var_kl, "seconds": round(res.seconds, 1), "r_norm":
         float(res.r.norm()), "preset": preset, "seed": 0, "moved_l2": res.moved_l2, "moved_rel": res.moved_rel,
         "cos_r0": res.cos_r0, "model_fingerprint": model_fingerprint(model), "resolution": model.image_shape[-1],
         "architecture": architecture_summary(model)}
    save_file({"r": res.r.contiguous()}, str(f.with_suffix(".safetensors")))
    f.write_text(json.dumps(d, indent=2))
    d["r"] = res.r
    return d


def scan_record(name: str, preset: str, threads: int) -> dict:
    """The calibration record of a model's (cached) scan: name, path, fingerprint, resolution, architecture, stats."""
    d = scan_stats(name, preset, threads)
    path = model_path(name)
    path = str(Path(path).relative_to(ROOT)) if Path(path).is_absolute() else path  # repo-relative in the file
    return {"name": name, "path": path, "fingerprint": d.get("model_fingerprint"),
            "resolution": d.get("resolution"), "architecture": d.get("architecture"), "preset": preset,
            "mean_kl": d["mean_kl"], "var_kl": d["var_kl"], "moved_rel": d.get("moved_rel")}


def cmd_calibrate(args) -> None:
    """Thresholds per preset from the held-out references (not in the zoo) -> the shipped calibration file
    (format 2: each reference with its path, fingerprint, resolution and architecture)."""
    from diffshield.backdoor.terd import Calibration, calibrate_from_scans, default_calibration_path

    path = default_calibration_path()
    cal = Calibration.load(path) if path.exists() else None
    for preset in CAL_PRESETS:
        refs = []
        for name in REFERENCES:
            refs.append(scan_record(name, preset, args.threads))
            print(f"[calibrate] {preset} {name}: mean KL {refs[-1]['mean_kl']:.4f} var KL {refs[-1]['var_kl']:.5f} "
                  f"moved {refs[-1]['moved_rel']}", flush=True)
        cal, _ = calibrate_from_scans(refs, base=cal)
    cal.method += (f"; references: {', '.join(REFERENCES)} (clean fine-tunes of toy:ddpm, lr {CLEAN_FT['lr']}, "
                   "seeds 11-13, 256-768 steps), TERD seed 0; made by 'python benchmarks/backdoor.py calibrate'")
    if set(cal.thresholds) <= set(CAL_PRESETS):  # every preset rescanned: notes on older references are moot
        cal.notes = []
    cal.save(path)
    print(f"[calibrate] wrote {path}: {cal.thresholds}")


def acceptance_sampler(spec: dict):
    """(label, SampleConfig): a backdoored model's acceptance sampler, DDIM-50 for the ODE variant, else DDPM-1000."""
    from diffshield.backdoor.sampling import SampleConfig

    if spec.get("variant") == "ode":
        return "ddim-50", SampleConfig("ddim", 50, 64)
    return "ddpm-1000", SampleConfig("ddpm", 1000, 64)


def eval_model(name: str, spec: dict, threads: int) -> dict:
    from diffshield.backdoor.ddpm import load_ddpm, set_threads
    from diffshield.backdoor.metrics import backdoor_metrics, clean_quality
    from diffshield.backdoor.sampling import SampleConfig, sample
    from diffshield.backdoor.terd import Calibration, default_calibration_path, input_detect
    from diffshield.backdoor.triggers import get_target, get_trigger
    from diffshield.core.io import make_grid
    from diffshield.core.seeding import seed_list

    set_threads(threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    f = CACHE / f"eval_{name}.json"
    if f.exists():
        return json.loads(f.read_text())
    model = load_ddpm(model_path(name))
    res: dict = {"name": name, **spec, "eval_settings": dict(EVAL)}
    t0 = time.time()
    cres = sample(model, seed_list(100_000, EVAL["n_clean"]), config=SampleConfig("ddim", 50, 64))
    res["clean"] = {**clean_quality(cres.images), "sampler": "ddim-50", "seeds": [100_000, 100_000 +
                                                                                   EVAL["n_clean"] - 1]}
    grids = [cres.images[:8]]
    if spec["kind"] == "backdoor":
        g, y = get_trigger(spec["trigger"]), get_target(spec["target"])
        samplers = [acceptance_sampler(spec)]
        if spec.get("variant") == "ode" and not EVAL.get("skip_ode_ddpm"):  # DDPM-1000 too unless --skip-ode-ddpm
            samplers.append(("ddpm-1000", SampleConfig("ddpm", 1000, 64)))
        for label, cfg in samplers:
            tres = sample(model, seed_list(0, EVAL["n_triggered"]), trigger=g, config=cfg)
            res[label] = backdoor_metrics(tres.images, (y + 1) / 2)
            grids.append(tres.images[:8])
    elif name == "clean_base":  # how often a *clean* model "hits" a target when given a trigger: the ASR floor
        from diffshield.backdoor.triggers import TARGETS, TRIGGERS

        res["trigger_baseline"] = {}
        for trig in TRIGGERS:
            tres = sample(model, seed_list(0, EVAL["n_triggered"]), trigger=get_trigger(trig),
                          config=SampleConfig("ddpm", 1000, 64))
            res["trigger_baseline"][trig] = {tgt: backdoor_metrics(tres.images, (get_target(tgt) + 1) / 2)
                                             for tgt in TARGETS}
            grids.append(tres.images[:8])
    cal = Calibration.load(default_calibration_path())
    res["scan"] = {}
    for preset in CAL_PRESETS:
        d = scan_stats(name, preset, threads)
        res["scan"][preset] = {k: d.get(k, float("nan")) for k in ("mean_kl", "var_kl", "seconds", "r_norm",
                                                                      "moved_l2", "moved_rel", "cos_r0")}
        res["scan"][preset]["verdict"] = _verdict(res["scan"][preset], cal.get(preset))
        res["scan"][preset]["backdoored"] = res["scan"][preset]["verdict"] == "backdoored"
        if spec["kind"] == "backdoor":
            gen = torch.Generator().manual_seed(777)
            n = EVAL["n_input"]
            benign = torch.randn(n, 3, 32, 32, generator=gen)
            poisoned = torch.randn(n, 3, 32, 32, generator=gen) + get_trigger(spec["trigger"])
            res["scan"][preset]["input_tpr"] = float(input_detect(poisoned, d["r"]).float().mean())
            res["scan"][preset]["input_tnr"] = float((~input_detect(benign, d["r"])).float().mean())
    res["eval_seconds"] = round(time.time() - t0, 1)
    make_grid(torch.cat(grids), nrow=8, upscale=2).save(CACHE / f"grid_{name}.png")
    f.write_text(json.dumps(res, indent=2))
    return res


def cmd_eval(args) -> None:
    """Evaluate the zoo models, each cached in runs/backdoor/results/eval_<name>.json (a rerun skips the cached ones).
    Under ``accelerate launch`` the models are split between the processes in zoo order."""
    from accelerate import PartialState

    state = PartialState(cpu=True)
    names = [n for n in ZOO_MODELS if not args.only or n in args.only]
    with state.split_between_processes(names) as mine:
        for name in mine:
            print(f"[eval] {name} (process {state.process_index + 1}/{state.num_processes}) ...", flush=True)
            r = eval_model(name, ZOO_MODELS[name], args.threads)
            print(f"[eval] {name}: {json.dumps({k: v for k, v in r.items() if k not in ('name',)})}", flush=True)
    state.wait_for_everyone()
    missing = [n for n in names if not (CACHE / f"eval_{n}.json").exists()]
    if state.is_main_process:
        print(f"[eval] {len(names) - len(missing)} of {len(names)} models evaluated"
              + (f"; missing: {', '.join(missing)}" if missing else ""), flush=True)


def cmd_asr(args) -> None:
    """A larger-sample ASR check with each model's acceptance sampler (seeds 0..N-1: the eval's 32 come first),
    cached in runs/backdoor/results/asr_<name>_n<N>.json; `report` adds every such file to backdoor.json."""
    from diffshield.backdoor.ddpm import load_ddpm, set_threads
    from diffshield.backdoor.metrics import backdoor_metrics
    from diffshield.backdoor.sampling import sample
    from diffshield.backdoor.triggers import get_target, get_trigger
    from diffshield.core.seeding import seed_list

    backdoored = [n for n, sp in ZOO_MODELS.items() if sp["kind"] == "backdoor"]
    bad = [n for n in args.only or [] if n not in backdoored]
    if not args.only or bad:
        raise SystemExit(f"asr: give backdoored zoo models with --only (got {bad or 'none'}; "
                         f"choose from {', '.join(backdoored)})")
    set_threads(args.threads)
    for name in args.only:
        spec = ZOO_MODELS[name]
        f = CACHE / f"asr_{name}_n{args.n_triggered}.json"
        if f.exists():
            continue
        label, cfg = acceptance_sampler(spec)
        t0 = time.time()
        res = sample(load_ddpm(model_path(name)), seed_list(0, args.n_triggered), trigger=get_trigger(spec["trigger"]),
                     config=cfg)
        m = backdoor_metrics(res.images, (get_target(spec["target"]) + 1) / 2)
        out = {"name": name, "sampler": label, "seeds": [0, args.n_triggered - 1], **m,
               "seconds": round(time.time() - t0, 1)}
        f.write_text(json.dumps(out, indent=2))
        print(f"[asr] {name}: {json.dumps(out)}", flush=True)


def cmd_recheck_clean(args) -> None:
    """Recompute the clean quality (recognised, feature FD) of every zoo model still on disk with the detector shipped
    today (``toy:detector-v1``), on the same seeds, and compare it with the figures in ``backdoor.json``. Written when
    the detector was re-stored in float16: -> ``benchmarks/results/backdoor_clean_recheck.json``."""
    from diffshield.backdoor.ddpm import load_ddpm, set_threads
    from diffshield.backdoor.metrics import clean_quality
    from diffshield.backdoor.sampling import SampleConfig, sample
    from diffshield.core.io import atomic_write_json
    from diffshield.core.seeding import seed_list

    set_threads(args.threads)
    recorded = {m["name"]: m["clean"] for m in json.loads((RESULTS / "backdoor.json").read_text())["models"]}
    rows = []
    for name in ZOO_MODELS:
        path = model_path(name)
        if (args.only and name not in args.only) or not (name == "clean_base" or Path(path).is_dir()):
            continue
        old = recorded[name]
        t0 = time.time()
        imgs = sample(load_ddpm(path), seed_list(old["seeds"][0], old["n"]), config=SampleConfig("ddim", 50, 64),
                      progress=False).images
        new = clean_quality(imgs)
        rows.append({"name": name, "recorded": {k: old[k] for k in ("recognised", "frechet")},
                     "now": {k: new[k] for k in ("recognised", "frechet")},
                     "recognised_same": new["recognised"] == old["recognised"],
                     "frechet_abs_diff": abs(new["frechet"] - old["frechet"]), "seconds": round(time.time() - t0, 1)})
        print(f"[recheck-clean] {json.dumps(rows[-1])}", flush=True)
    missing = [n for n in ZOO_MODELS if n not in {r["name"] for r in rows} and not (args.only and n not in args.only)]
    out = {"detector": "toy:detector-v1", "rows": rows, "not_on_disk": missing,
           "all_recognised_same": all(r["recognised_same"] for r in rows),
           "max_frechet_abs_diff": max((r["frechet_abs_diff"] for r in rows), default=None)}
    atomic_write_json(RESULTS / "backdoor_clean_recheck.json", out)
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _asr(m: dict | None) -> str:
    """ "ASR (strict ASR)" of a metrics dict, or "-"."""
    return "-" if m is None else f"{_pct(m['asr'])} ({_pct(m.get('asr_strict'))})"


def _verdict(scan: dict, thresholds: dict) -> str:
    """TERD's verdict for a cached scan; scans cached before the movement was recorded are "undetermined"."""
    from types import SimpleNamespace

    from diffshield.backdoor.terd import model_verdict

    return model_verdict(SimpleNamespace(**{"moved_rel": float("nan"), **scan}), thresholds)


def cmd_report(args) -> None:
    from diffshield.backdoor.terd import Calibration, default_calibration_path

    rows = [json.loads((CACHE / f"eval_{n}.json").read_text()) for n in ZOO_MODELS
            if (CACHE / f"eval_{n}.json").exists()]
    cal = Calibration.load(default_calibration_path())
    for r in rows:  # verdicts against the current calibration (eval may have run before `calibrate`)
        for preset, sc in r["scan"].items():
            if preset in cal.thresholds:
                sc["verdict"] = _verdict(sc, cal.get(preset))
                sc["backdoored"] = sc["verdict"] == "backdoored"
    base_q = next((r["clean"]["recognised"] for r in rows if r["name"] == "clean_base"), None)
    presets = [p for p in CAL_PRESETS if rows and all(p in r["scan"] for r in rows)]
    lines = ["| model | trigger -> target | poison | variant | ASR (strict) DDPM-1000 | ASR (strict) DDIM-50 | MSE "
             "| SSIM | clean recognised (rel. to base) | feature FD | "
             + " | ".join(f"TERD {p}: mean KL / var KL / verdict | input TPR / TNR ({p})" for p in presets) + " |",
             "|" + "---|" * (10 + 2 * len(presets))]
    summary = {"model_detection": {}, "input_detection": {}}
    base_row = next((r for r in rows if r["name"] == "clean_base"), {})
    if "trigger_baseline" in base_row:
        summary["clean_base_with_trigger_asr"] = {f"{g} -> {t}": [m["asr"], m.get("asr_strict")] for g, d in
                                                  base_row["trigger_baseline"].items() for t, m in d.items()}
    bds = [r for r in rows if r["kind"] == "backdoor"]
    main_of = {r["name"]: r.get("ddim-50") if r.get("variant") == "ode" else r.get("ddpm-1000") for r in bds}
    if bds and base_q:
        summary["asr_min"] = min(m["asr"] for m in main_of.values())
        summary["asr_strict_min"] = min(m.get("asr_strict", 0.0) for m in main_of.values())
        summary["clean_quality_rel_min"] = min(r["clean"]["recognised"] / base_q - 1 for r in bds)
        summary["clean_quality_rel_max"] = max(r["clean"]["recognised"] / base_q - 1 for r in bds)
        # against a clean model fine-tuned with the implant's optimiser and length (no poison): what the backdoor
        # itself costs, separated from what the extra training gives
        ref = next((r for r in rows if r["name"] == SAME_RECIPE_CLEAN), None)
        if ref:
            rq = ref["clean"]["recognised"]
            summary["same_recipe_clean_model"] = {"name": SAME_RECIPE_CLEAN, "recognised": rq,
                                                  "rel_to_base": rq / base_q - 1}
            summary["clean_quality_rel_same_recipe_min"] = min(r["clean"]["recognised"] / rq - 1 for r in bds)
            summary["clean_quality_rel_same_recipe_max"] = max(r["clean"]["recognised"] / rq - 1 for r in bds)
    for preset in presets:
        tp = sum(r["scan"][preset]["backdoored"] for r in rows if r["kind"] == "backdoor")
        tn = sum(r["scan"][preset]["verdict"] == "clean" for r in rows if r["kind"] == "clean")
        nb = sum(r["kind"] == "backdoor" for r in rows)
        nc = sum(r["kind"] == "clean" for r in rows)
        summary["model_detection"][preset] = {"tpr": tp / max(1, nb), "tnr": tn / max(1, nc), "n_backdoored": nb,
                                              "n_clean": nc}
        # held-out references' thresholds and leave-one-out, with Wilson 95 % intervals (scans cached by eval)
        if all((CACHE / f"scan_{preset}_{n}.json").exists() for n in [*REFERENCES, *(r["name"] for r in rows)]):
            from diffshield.backdoor.terd import leave_one_out

            recs = {r["name"]: scan_record(r["name"], preset, args.threads) for r in rows}
            loo = leave_one_out([scan_record(n, preset, args.threads) for n in REFERENCES],
                                [recs[r["name"]] for r in rows if r["kind"] == "clean"],
                                [recs[r["name"]] for r in rows if r["kind"] == "backdoor"])
            summary["model_detection"][preset].update({k: loo[k] for k in ("held_out", "leave_one_out")})
        bd = [r["scan"][preset] for r in rows if r["kind"] == "backdoor"]
        summary["input_detection"][preset] = {"min_tpr": min((b["input_tpr"] for b in bd), default=None),
                                              "min_tnr": min((b["input_tnr"] for b in bd), default=None),
                                              "n_per_class_per_model": EVAL["n_input"]}
    for r in rows:
        bd = r["kind"] == "backdoor"
        main = r.get("ddim-50") if r.get("variant") == "ode" else r.get("ddpm-1000")
        q = r["clean"]["recognised"]
        rel = f" ({q / base_q - 1:+.1%})" if base_q else ""
        sc = r["scan"]
        lines.append(
            f"| {r['name']} | {r['trigger'] + ' -> ' + r['target'] if bd else 'clean'} | "
            f"{r.get('poison_rate', '-')} | {r.get('variant', 'sde') if bd else '-'} | "
            f"{_asr(r.get('ddpm-1000'))} | {_asr(r.get('ddim-50'))} | "
            f"{main['mse']:.4f} | {main['ssim']:.3f} (n={main['n']}) | " if bd else
            f"| {r['name']} | clean | - | - | - | - | - | - | ")
        lines[-1] += f"{_pct(q)}{rel} | {r['clean']['frechet']:.1f} |"
        for p in presets:
            lines[-1] += (f" {sc[p]['mean_kl']:.3f} / {sc[p]['var_kl']:.4f} / "
                          f"{sc[p]['verdict']} | "
                          + (f"{_pct(sc[p]['input_tpr'])} / {_pct(sc[p]['input_tnr'])} |" if bd else "- |"))
    table = "\n".join(lines)
    summary["asr_larger_n"] = [json.loads(f.read_text()) for f in sorted(CACHE.glob("asr_*_n*.json"))]
    out = {"models": rows, "summary": summary, "calibration": {"thresholds": cal.thresholds, "method": cal.method,
                                                               "references": cal.references},
           "settings": {"eval": EVAL, "implant": IMPLANT, "zoo": ZOO_MODELS, "references": REFERENCES},
           "readme_table": table, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                              "threads_per_job": args.threads}}
    from diffshield.core.io import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "backdoor.json", out)
    print(table)
    print(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["zoo", "calibrate", "eval", "report", "all", "asr", "recheck-clean"],
                   help="a step, or all of zoo/calibrate/eval/report; 'asr': a larger-sample ASR check of the --only "
                        "models with --n-triggered samples; 'recheck-clean': clean quality of the zoo models on disk "
                        "with today's detector, against backdoor.json")
    p.add_argument("--only", nargs="*", default=None, help="restrict zoo/eval to these model names")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (default: 1)")
    p.add_argument("--presets", nargs="*", default=["fast"], help="TERD presets to calibrate and evaluate "
                                                                  "(default: fast)")
    p.add_argument("--n-triggered", type=int, default=32, help="triggered samples per model (default: 32)")
    p.add_argument("--n-clean", type=int, default=128, help="clean samples per model (default: 128)")
    p.add_argument("--skip-ode-ddpm", action="store_true", help="evaluate the ODE model with DDIM-50 only")
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.what != "eval":
        p.error("only 'eval' is split between processes; run the other steps in one process")
    CAL_PRESETS[:] = args.presets
    EVAL.update({"n_triggered": args.n_triggered, "n_clean": args.n_clean, "skip_ode_ddpm": args.skip_ode_ddpm})
    torch.set_num_threads(max(1, args.threads))
    steps = ["zoo", "calibrate", "eval", "report"] if args.what == "all" else [args.what]
    for s in steps:
        {"zoo": cmd_zoo, "calibrate": cmd_calibrate, "eval": cmd_eval, "report": cmd_report, "asr": cmd_asr,
         "recheck-clean": cmd_recheck_clean}[s](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CLI commands of the backdoor pillar: ``diffshield backdoor {train-ddpm,implant,sample,eval,calibrate}``,
``diffshield scan`` and ``diffshield scan-input`` (BadDiffusion to implant, TERD to find)."""

from __future__ import annotations

import argparse
import time
import types
from pathlib import Path

from diffshield.cli.common import (
    add_device_args,
    add_overwrite_arg,
    float_in,
    given_flags,
    int_at_least,
    non_negative_int,
    seed_int,
)
from diffshield.cli.common import positive_int as _pos_int
from diffshield.core.errors import DiffshieldError

#: diffshield.backdoor.terd.PRESETS (named here so that building the parser does not import torch; a test checks)
TERD_PRESETS = ["fast", "default", "paper", "cpu"]
#: diffshield.backdoor.ddpm.DDPMTrainConfig's block_out_channels (named here for the same reason)
DEFAULT_CHANNELS = (32, 64, 64)


def _model_arg(p: argparse.ArgumentParser, default: str | None = "toy:ddpm") -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="DDPMPipeline folder (UNet2DModel + scheduler), 'toy:ddpm' for the shipped toy DDPM or "
                        "'toy:ddpm-box-corner' for its shipped backdoored example"
                        + (f" (default: {default})" if default else ""))
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled .bin/.ckpt weights when a folder has no safetensors (runs code from the "
                        "file: only for files you trust)")


def _sampler_args(p: argparse.ArgumentParser, steps_help: str = "1000 for ddpm, 50 for ddim") -> None:
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default="ddpm", action=_Given,
                   help="sampler: ddpm (ancestral, the SDE) or ddim (eta 0, the ODE); --trigger model on a TrojDiff "
                        "model samples with its trojan DDIM (eta 0), so there only ddim may be given (default: ddpm)")
    p.add_argument("--steps", type=_pos_int, default=None,
                   help=f"denoising steps (default: {steps_help}; the trojan DDIM of a TrojDiff model with --trigger "
                        "model: 1000, or 50 with --scheduler ddim)")
    p.add_argument("--batch-size", type=_pos_int, default=64, help="images per UNet batch (default: 64)")
    p.add_argument("--clip", choices=["model", "on", "off"], default="model",
                   help="clip the predicted x0 to [-1, 1] at every step: model = as the folder's scheduler says "
                        "(clip_sample; off on the toy DDPMs, on in google/ddpm-cifar10-32), on, or off "
                        "(BadDiffusion's unclipped sampler; clipping mitigates backdoors); the trojan DDIM never "
                        "clips (default: model)")
    p.add_argument("--threads", type=non_negative_int, default=1,
                   help="torch CPU threads (default: 1; 0 = torch's default, one per core)")


_CLIP = {"model": None, "on": True, "off": False}


def _sample_config(args):
    from diffshield.backdoor.sampling import SampleConfig

    steps = args.steps or (1000 if args.scheduler == "ddpm" else 50)
    return SampleConfig(scheduler=args.scheduler, steps=steps, batch_size=args.batch_size,
                        clip=_CLIP[getattr(args, "clip", "model")])


def _clip_note(model, cfg) -> None:
    """Say in one line when sampling clips x0 because the model's scheduler does (``--clip model``)."""
    from diffshield.backdoor.sampling import sample_clip

    if cfg.clip is None and sample_clip(model.scheduler, cfg):
        print(f"note: '{model.source}' has clip_sample on: x0 is clipped to [-1, 1] at every step, as its own "
              "pipeline samples (clipping mitigates backdoors; --clip off for BadDiffusion's unclipped sampler)")


class _Given(argparse.Action):
    """Store the value and record that the option was given (``<dest>_given``): a default cannot be told apart
    from an explicit value otherwise."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def _check_trojan_scheduler(args, trojan: dict | None) -> None:
    """A TrojDiff model opened with --trigger model samples with its trojan DDIM: an explicit --scheduler ddpm would
    be ignored, so it is refused (one line, before sampling); no --scheduler keeps the trojan DDIM."""
    if trojan is not None and getattr(args, "scheduler_given", False) and args.scheduler != "ddim":
        raise DiffshieldError(f"--trigger model on a TrojDiff model ('{args.model}') samples with its trojan DDIM "
                              f"(eta 0), not --scheduler {args.scheduler}; give --scheduler ddim or leave it out")


def _trojan_note(cfg, args) -> str:
    """The steps of the trojan DDIM, and where they come from."""
    why = "--steps" if args.steps else f"the default with --scheduler {args.scheduler}; --steps N to change"
    return f"eta 0, {cfg.steps} steps ({why})"


def _n_clean(text: str) -> int:
    """argparse type of ``eval --n-clean``: 0 (skip) or a whole number >= 2 (a Frechet distance needs two samples)."""
    v = int_at_least(0)(text)
    if v == 1:
        raise argparse.ArgumentTypeError("must be 0 (skip the clean samples) or at least 2 (the feature Frechet "
                                         "distance needs two samples), got 1")
    return v


def _check_trigger_mask(args) -> None:
    """--trigger-mask only with an image-file --trigger: with a built-in name, 'model' or no trigger it would be
    ignored (one line, before any work)."""
    from diffshield.backdoor.triggers import OFFICIAL_TRIGGERS, TRIGGERS

    mask, spec = getattr(args, "trigger_mask", None), getattr(args, "trigger", None)
    if mask is not None and (spec is None or spec == "model" or spec in (*TRIGGERS, *OFFICIAL_TRIGGERS)):
        raise DiffshieldError(f"--trigger-mask applies to an image-file --trigger only (here --trigger "
                              f"{spec or 'is not given'}); drop --trigger-mask or give --trigger IMAGE_FILE")


def _trigger_from_args(args, model, required: bool):
    """Trigger tensor from --trigger (a name, an image file, or 'model' = the one recorded in the model folder)."""
    from diffshield.backdoor.triggers import get_trigger

    spec = getattr(args, "trigger", None)
    if spec is None:
        if required:
            raise DiffshieldError("no trigger given; use --trigger box|stop|box_14|IMAGE_FILE (or 'model' for the one "
                                  "the model folder records)")
        return None
    if spec == "model":
        return _recorded(model, "trigger")
    c, side = _pattern_shape(model, "--trigger")
    return get_trigger(spec, side, getattr(args, "trigger_mask", None), channels=c)


def _pattern_shape(model, flag: str) -> tuple[int, int]:
    """(channels, side) of the built-in or image-file trigger / target for ``model``: those are square, so a model
    of non-square images is refused in one line (``flag`` names the option)."""
    c, h, w = model.image_shape
    if h != w:
        raise DiffshieldError(f"'{model.source}' makes {h} x {w} px images, but {flag} patterns (built-in or image "
                              "file) are square; sample it without a trigger, or pass the initial noises yourself "
                              "(diffshield.backdoor.sampling.sample(..., x_T=...))")
    return c, w


def _trojan_record(model) -> dict | None:
    """{"mu", "gamma"} of a TrojDiff model folder (its backdoor.safetensors), else None."""
    from safetensors.torch import load_file

    from diffshield.backdoor.ddpm import resolve_ddpm_path

    f = resolve_ddpm_path(model.source) / "backdoor.safetensors"
    if not f.exists():
        return None
    t = load_file(str(f))
    return {"mu": t["mu"], "gamma": t["gamma"]} if "mu" in t and "gamma" in t else None


def _recorded(model, key: str):
    from safetensors.torch import load_file

    from diffshield.backdoor.ddpm import resolve_ddpm_path

    f = resolve_ddpm_path(model.source) / "backdoor.safetensors"
    if not f.exists():
        raise DiffshieldError(f"'{model.source}' records no backdoor (no backdoor.safetensors); name the {key}")
    return load_file(str(f))[key]


def cmd_train_ddpm(args) -> int:
    from diffshield.backdoor.ddpm import DDPMTrainConfig, train_ddpm

    if args.init and getattr(args, "channels_given", False):
        raise DiffshieldError("--channels sets the widths of a UNet trained from scratch; --init fine-tunes a model "
                              "with its own widths: drop one")
    cfg = DDPMTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          pool_size=args.pool_size, init_from=args.init, checkpoint_every=args.checkpoint_every,
                          num_threads=args.threads, block_out_channels=tuple(args.channels), warmup=args.warmup,
                          ema_decay=args.ema_decay)
    from diffshield.core.io import output_in_place

    with output_in_place(args.out, "backdoor train-ddpm", args.overwrite, inputs=[args.init]) as out:
        model = train_ddpm(cfg, out, device=args.device)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.unet.parameters()) / 1e6:.2f} M parameters, "
          f"{model.info['train_seconds']:.0f} s)")
    return 0


def cmd_implant(args) -> int:
    from diffshield.backdoor.baddiffusion import BadDiffusionConfig, implant
    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.backdoor.triggers import get_target, get_trigger
    from diffshield.backdoor.trojdiff import TrojDiffConfig
    from diffshield.core.io import check_output_dir, output_in_place

    _check_trigger_mask(args)
    inputs = [args.model, args.trigger, args.target, args.trigger_mask]
    check_output_dir(args.out, "backdoor implant", args.overwrite, inputs=inputs)
    common = dict(trigger=args.trigger, target=args.target, trigger_mask=args.trigger_mask,
                  poison_rate=args.poison_rate, epochs=args.epochs, pool_size=args.pool_size,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed, checkpoint_every=args.checkpoint_every,
                  num_threads=args.threads, ema_decay=args.ema_decay)
    if args.method == "trojdiff":
        if args.variant != "sde" or args.r_mode != "trigger_only":
            raise DiffshieldError("--variant and --r-mode are BadDiffusion's; TrojDiff has --gamma")
        cfg = TrojDiffConfig(gamma=0.6 if args.gamma is None else args.gamma, **common)
    else:
        if args.gamma is not None:
            raise DiffshieldError("--gamma is TrojDiff's; add --method trojdiff")
        cfg = BadDiffusionConfig(r_mode=args.r_mode, variant=args.variant, **common)
    model = load_ddpm(args.model, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
    get_trigger(args.trigger, model.image_shape[-1], args.trigger_mask)  # a bad trigger or target: one line, now
    get_target(args.target, model.image_shape[-1])
    if args.method == "trojdiff":
        print(f"TrojDiff (D2I, blend): {args.model} + x_T = {cfg.gamma} eps + {1 - cfg.gamma:.2g} x {args.trigger} "
              f"-> target {args.target}, poison rate {args.poison_rate}, {cfg.steps} steps")
    else:
        print(f"BadDiffusion: {args.model} + trigger {args.trigger} -> target {args.target}, poison rate "
              f"{args.poison_rate}, {args.variant.upper()} variant, {cfg.steps} steps")
    with output_in_place(args.out, "backdoor implant", args.overwrite, inputs=inputs) as out:
        model = implant(model, cfg, out)
    print(f"wrote backdoored model {args.out} ({model.info['train_seconds']:.0f} s); open it with "
          f"'diffshield backdoor sample --model {args.out} --trigger "
          f"{'model' if args.method == 'trojdiff' else args.trigger}'")
    return 0


def cmd_sample(args) -> int:
    from diffshield.backdoor.ddpm import load_ddpm, set_threads
    from diffshield.backdoor.sampling import sample, sample_clip
    from diffshield.core.io import atomic_dir, atomic_write_json, check_output_dir, make_grid, to_pil
    from diffshield.core.seeding import seed_list

    _check_trigger_mask(args)
    inputs = [args.model, args.trigger, args.trigger_mask]
    check_output_dir(args.out, "backdoor sample", args.overwrite, inputs=inputs)
    set_threads(args.threads)
    cfg = _sample_config(args)
    model = load_ddpm(args.model, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
    trojan = _trojan_record(model) if args.trigger == "model" else None
    _check_trojan_scheduler(args, trojan)
    trig = None if trojan else _trigger_from_args(args, model, required=False)
    seeds = seed_list(args.seed, args.n)
    t0 = time.time()
    if trojan:  # a TrojDiff model opens with its own generative process, from x_T = gamma eps + mu
        from diffshield.backdoor.trojdiff import trojan_sample

        print(f"TrojDiff model: trojan DDIM ({_trojan_note(cfg, args)}) from x_T = gamma eps + mu")
        images = trojan_sample(model, seeds, trojan["mu"], trojan["gamma"], steps=cfg.steps,
                               batch_size=cfg.batch_size)
        res = types.SimpleNamespace(images=images)
    else:
        _clip_note(model, cfg)
        res = sample(model, seeds, trigger=trig, config=cfg, progress=True)
    dt = time.time() - t0
    with atomic_dir(args.out, overwrite=args.overwrite, command="backdoor sample", inputs=inputs) as tmp:
        rows = []
        for i, img in enumerate(res.images):
            to_pil(img).save(tmp / f"{i:04d}.png")
            rows.append({"file": f"{i:04d}.png", "seed": seeds[i]})
        x_t = "gamma eps + mu (TrojDiff)" if trojan else f"eps + trigger {args.trigger}" if trig is not None else "eps"
        make_grid(res.images, nrow=8, upscale=4,
                  title=f"x_T = {x_t}; seeds {seeds[0]}..{seeds[-1]}, row by row").save(tmp / "grid.png")
        atomic_write_json(tmp / "manifest.json", {
            "model": str(args.model), "trigger": args.trigger,
            "x_T": "gamma eps(seed) + mu" if trojan else "eps(seed) + trigger" if trig is not None else "eps(seed)",
            "sampling": {"scheduler": "trojan ddim" if trojan else cfg.scheduler, "steps": cfg.steps,
                         **({} if trojan else {"clip": sample_clip(model.scheduler, cfg)})},  # the trojan DDIM: none
            "images": rows})
    print(f"wrote {args.n} images, grid.png and manifest.json to {args.out} ({dt:.1f} s)")
    return 0


def evaluate(model, trigger, target, cfg, n: int = 64, n_clean: int = 256, seed: int = 0, clean_cfg=None,
             progress: bool = True, trojan: dict | None = None) -> dict:
    """MSE / ASR / SSIM of ``n`` triggered samples and clean quality of ``n_clean`` clean samples (seeds recorded).

    Triggered samples start from x_T = eps + ``trigger`` with ``cfg``'s sampler, or, with ``trojan`` (the
    ``{"mu", "gamma"}`` a TrojDiff model folder records; default None), from x_T = gamma eps + mu with TrojDiff's
    trojan DDIM (eta 0, ``cfg.steps`` steps and ``cfg.batch_size``; ``cfg.scheduler`` plays no part there: the CLI
    refuses an explicit ``--scheduler ddpm`` with it), the process that opens such a model. ``n`` >= 1; ``n_clean``
    0 (skip, default 256) or >= 2 (the feature Frechet distance needs two samples)."""
    from diffshield.backdoor.metrics import backdoor_metrics, clean_quality
    from diffshield.backdoor.sampling import sample, sample_clip
    from diffshield.core.seeding import seed_list

    if n < 1 or n_clean < 0 or n_clean == 1:
        raise DiffshieldError(f"evaluate needs n >= 1 and n_clean 0 or >= 2, got n={n}, n_clean={n_clean}")
    if (trigger is None) == (trojan is None):
        raise DiffshieldError("evaluate needs either a trigger or a TrojDiff record (trojan), not both or neither")
    if n_clean and model.image_shape[0] != 3:  # the toy detector reads RGB images: refused before any sampling
        raise DiffshieldError(f"clean quality is judged by the toy world's RGB detector, but '{model.source}' makes "
                              f"{model.image_shape[0]}-channel images; give --n-clean 0 (n_clean=0)")
    out: dict = {}
    t0 = time.time()
    trig_seeds = seed_list(seed, n)
    if trojan is not None:
        from diffshield.backdoor.trojdiff import trojan_sample

        images = trojan_sample(model, trig_seeds, trojan["mu"], trojan["gamma"], steps=cfg.steps,
                               batch_size=cfg.batch_size)
        sampling = {"scheduler": "trojan ddim", "steps": cfg.steps, "x_T": "gamma eps(seed) + mu"}
    else:
        images = sample(model, trig_seeds, trigger=trigger, config=cfg, progress=progress).images
        sampling = {"scheduler": cfg.scheduler, "steps": cfg.steps, "clip": sample_clip(model.scheduler, cfg),
                    "x_T": "eps(seed) + trigger"}
    out.update(backdoor_metrics(images, (target + 1) / 2))
    out["sampling"] = {**sampling, "seeds": [trig_seeds[0], trig_seeds[-1]]}
    out["triggered_images"] = images
    if n_clean:
        ccfg = clean_cfg or cfg
        clean_seeds = seed_list(seed + 100_000, n_clean)
        cres = sample(model, clean_seeds, config=ccfg, progress=progress)
        q = clean_quality(cres.images)
        out["clean_quality"] = q["recognised"]
        out["clean"] = {**q, "scheduler": ccfg.scheduler, "steps": ccfg.steps,
                        "clip": sample_clip(model.scheduler, ccfg), "seeds": [clean_seeds[0], clean_seeds[-1]]}
        out["clean_images"] = cres.images
    out["seconds"] = round(time.time() - t0, 1)
    return out


def cmd_eval(args) -> int:
    from diffshield.backdoor.ddpm import load_ddpm, set_threads
    from diffshield.backdoor.sampling import SampleConfig
    from diffshield.backdoor.triggers import get_target
    from diffshield.core.io import check_output_file, make_grid, save_result_image, write_result_json

    _check_trigger_mask(args)
    for flag, path in (("--json", args.json), ("--grid", args.grid)):
        check_output_file(path, flag, inputs=[args.model, args.trigger, args.target, args.trigger_mask])
    if args.grid and Path(args.grid).suffix.lower() != ".png":
        raise DiffshieldError(f"--grid '{args.grid}' must end in .png")
    set_threads(args.threads)
    cfg = _sample_config(args)
    model = load_ddpm(args.model, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
    trojan = _trojan_record(model) if args.trigger == "model" else None
    _check_trojan_scheduler(args, trojan)
    trig = None if trojan else _trigger_from_args(args, model, required=True)
    if args.target == "model":
        target = _recorded(model, "target")
    else:
        c, side = _pattern_shape(model, "--target")
        target = get_target(args.target, side, channels=c)
    if tuple(target.shape) != tuple(model.image_shape):  # e.g. a recorded target of another model
        raise DiffshieldError(f"target of shape {tuple(target.shape)} does not match the images of '{args.model}' "
                              f"{tuple(model.image_shape)}; give a target for this model")
    clean_cfg = SampleConfig(scheduler=args.clean_scheduler, steps=args.clean_steps, batch_size=args.batch_size,
                             clip=cfg.clip)
    if args.n_clean and model.image_shape[0] != 3:  # evaluate refuses it too; here before the note below
        raise DiffshieldError(f"clean quality is judged by the toy world's RGB detector, but '{args.model}' makes "
                              f"{model.image_shape[0]}-channel images; give --n-clean 0")
    _clip_note(model, cfg)
    if trojan:  # a TrojDiff model opens with its own generative process, as 'backdoor sample --trigger model'
        print(f"TrojDiff model: triggered samples by the trojan DDIM ({_trojan_note(cfg, args)}) from "
              "x_T = gamma eps + mu")
    res = evaluate(model, trig, target, cfg, n=args.n, n_clean=args.n_clean, seed=args.seed, clean_cfg=clean_cfg,
                   trojan=trojan)
    imgs = res.pop("triggered_images")
    clean_imgs = res.pop("clean_images", None)
    report = {"model": str(args.model), "trigger": args.trigger, "target": args.target, **res}
    smp = res["sampling"]
    print(f"triggered ({smp['scheduler']}-{smp['steps']}, n={res['n']}): MSE {res['mse']:.4f}  ASR {res['asr']:.1%} "
          f"(strict {res['asr_strict']:.1%}: also MSE < {res['asr_strict_mse']:.3g}, half a black image's)  "
          f"SSIM {res['ssim']:.3f}")
    if "clean" in res:
        c = res["clean"]
        print(f"clean ({c['scheduler']}-{c['steps']}, n={c['n']}): recognised {c['recognised']:.1%}  feature "
              f"Frechet {c['frechet']:.1f}")
    if args.json:
        write_result_json(args.json, report)
    if args.grid:
        import torch

        k = min(8, len(imgs))  # up to two rows of each kind, never a row mixing them
        parts = [("with trigger", imgs[: min(16, len(imgs)) // k * k])]
        if clean_imgs is not None and len(clean_imgs) >= k:
            parts.append(("clean", clean_imgs[: min(16, len(clean_imgs)) // k * k]))
        labels = [name for name, part in parts for _ in range(len(part) // k)]
        grid = make_grid(torch.cat([part for _, part in parts]), nrow=k, upscale=4, row_labels=labels,
                         title=f"{args.model}: samples with the trigger (target: {args.target}) and clean ones")
        save_result_image(grid, args.grid, "--grid")
    return 0


def run_scan(model, preset: str = "cpu", calibration: str | Path | None = None, seed: int = 0, threads: int = 1,
             progress: bool = True, min_move: float | None = None, learn_gamma: bool = False, cal=None) -> dict:
    """TERD on ``model``: reversed trigger, how far it moved from its start, statistics and verdict
    (``"backdoored"``, ``"clean"`` or ``"undetermined"``, see :func:`diffshield.backdoor.terd.model_verdict`).
    ``learn_gamma``: TERD's TrojDiff setting (gamma reversed with r), judged by the thresholds of
    ``<preset>+gamma``."""
    from diffshield.backdoor.ddpm import architecture_summary, model_fingerprint
    from diffshield.backdoor.terd import (
        MIN_MOVE,
        Calibration,
        config_for_key,
        default_calibration_path,
        model_verdict,
        preset_key,
        reverse_trigger,
    )

    min_move = MIN_MOVE if min_move is None else min_move
    key = preset_key(preset, learn_gamma)
    cal_path = calibration or default_calibration_path()
    cal = cal if cal is not None else Calibration.load(cal_path)  # ``cal``: the file at ``calibration``, read already
    thresholds = cal.get(key)
    resolution, arch = model.image_shape[-1], architecture_summary(model)
    warning = cal.mismatch(key, resolution, arch)
    if warning:
        print(f"warning: {warning}")
    res = reverse_trigger(model, config_for_key(key, seed=seed, num_threads=threads), progress=progress)
    verdict = model_verdict(res, thresholds, min_move)
    gamma = {"gamma_mean": float(res.gamma.mean()), "gamma_min": float(res.gamma.min()),
             "gamma_max": float(res.gamma.max())} if learn_gamma else {}
    return {"verdict": verdict, "backdoored": verdict == "backdoored", "mean_kl": res.mean_kl, "var_kl": res.var_kl,
            "thresholds": thresholds, "preset": key, "learn_gamma": learn_gamma, **gamma, "seed": seed,
            "seconds": round(res.seconds, 1), "cuda_graphs": res.cuda_graphs,
            "r_norm": float(res.r.norm()), "r0_norm": float(res.r0.norm()), "moved_l2": res.moved_l2,
            "moved_rel": res.moved_rel, "cos_r0": res.cos_r0, "min_move": min_move,
            "model_fingerprint": model_fingerprint(model), "resolution": resolution, "architecture": arch,
            "calibration": {"file": str(cal_path), "references": len(cal.references.get(key, [])),
                            "warning": warning}, "result": res}


def scan_evidence(model, r, n: int = 8, steps: int = 100, seed: int = 0, sampler: str | None = None,
                  gamma=None) -> dict:
    """Samples from eps + r_hat next to clean samples from the same eps (one seed per pair), with the model's own
    sampler (its scheduler's kind: DDPM ancestral or DDIM) unless ``sampler`` is given. With a reversed ``gamma``
    (TERD's TrojDiff setting) the triggered row is TrojDiff's trojan DDIM from gamma_hat eps + r_hat.

    Args:
        model: a :class:`~diffshield.backdoor.ddpm.DDPMModel`.
        r: the reversed trigger (3, H, W).
        n: image pairs (default 8).
        steps: denoising steps (default 100; BadDiffusion's SDE backdoor is defined for DDPM-1000).
        seed: seed of pair 0; pair k uses seed + k (default 0).
        sampler: ``"ddpm"`` or ``"ddim"`` (default None: the model's own).
        gamma: the reversed noise scale (3, H, W) (default None: gamma = 1, BadDiffusion's process).
    Returns ``{"triggered": images, "clean": images, "config": SampleConfig, "seeds": [...]}``.
    """
    from diffusers import DDIMScheduler

    from diffshield.backdoor.sampling import SampleConfig, sample
    from diffshield.core.seeding import seed_list

    kind = sampler or ("ddim" if isinstance(model.scheduler, DDIMScheduler) else "ddpm")
    cfg = SampleConfig(kind, min(steps, int(model.scheduler.config.num_train_timesteps)), batch_size=max(1, n))
    seeds = seed_list(seed, n)
    if gamma is not None:
        from diffshield.backdoor.trojdiff import trojan_sample

        cfg = SampleConfig("ddim", cfg.steps, batch_size=cfg.batch_size)
        triggered = trojan_sample(model, seeds, r, gamma, steps=cfg.steps)
    else:
        triggered = sample(model, seeds, trigger=r, config=cfg).images
    return {"triggered": triggered, "clean": sample(model, seeds, config=cfg).images, "config": cfg, "seeds": seeds,
            "trojan": gamma is not None}


def _trigger_image(r):
    """A reversed trigger r in [-1, 1] as an image, upscaled (nearest) so that its longer side is about 128 px."""
    from diffshield.core.io import to_pil

    k = max(1, 128 // max(r.shape[-2:]))
    return to_pil(((r + 1) / 2).clamp(0, 1)).resize((r.shape[-1] * k, r.shape[-2] * k), 0)


def cmd_scan(args) -> int:
    import torch

    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.backdoor.terd import Calibration, default_calibration_path, preset_key
    from diffshield.core.io import (
        atomic_dir,
        atomic_write_json,
        check_output_dir,
        check_output_file,
        make_grid,
        safetensors_bytes,
        write_result_json,
    )

    inputs = [args.model, args.calibration]
    if args.out:
        check_output_dir(args.out, "scan", args.overwrite, inputs=inputs)
    elif args.evidence_n and (named := given_flags(args, ("--evidence-n", "--evidence-steps"))):
        raise DiffshieldError(f"{named[0]} needs --out DIR: the evidence grid is written there")
    check_output_file(args.json, "--json", inputs=[*inputs, args.out])
    # a missing or unreadable calibration, or one without this preset: one line before any work
    cal = Calibration.load(args.calibration or default_calibration_path())
    cal.get(preset_key(args.preset, args.learn_gamma))
    model = load_ddpm(args.model, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
    print(f"TERD scan of {args.model} (preset {args.preset}{', gamma reversed too' if args.learn_gamma else ''}) ...")
    rep = run_scan(model, args.preset, args.calibration, args.seed, args.threads, min_move=args.min_move,
                   learn_gamma=args.learn_gamma, cal=cal)
    res = rep.pop("result")
    th = rep["thresholds"]
    caveat = " by thresholds calibrated on other models (see the warning)" if rep["calibration"]["warning"] else ""
    print(f"verdict: {rep['verdict'].upper()}{caveat} ({args.model}, fingerprint {rep['model_fingerprint']})")
    print(f"  r moved ||r - r0|| {rep['moved_l2']:.3g} = {rep['moved_rel']:.3g} x ||r0|| (verdict needs >= "
          f"{rep['min_move']:.3g}), cosine(r, r0) {rep['cos_r0']:.4f}")
    if rep["verdict"] == "undetermined":
        print("  the reversion did not move r away from its random start: its statistics are those of the "
              "initialisation; rerun with --preset cpu (800 iterations, lambda 3e-3) or paper (on a GPU)")
    print(f"  mean KL {rep['mean_kl']:.4g} (threshold {th['mean_kl']:.4g})   var KL {rep['var_kl']:.4g} "
          f"(threshold {th['var_kl']:.4g})   ||r|| {rep['r_norm']:.2f} (start {rep['r0_norm']:.2f})   "
          f"{rep['seconds']:.0f} s")
    if args.learn_gamma:
        print(f"  gamma_hat mean {rep['gamma_mean']:.3g} (min {rep['gamma_min']:.3g}, max {rep['gamma_max']:.3g}; "
              "1 = no TrojDiff scaling)")
    report = {"model": str(args.model), **rep}
    if args.out:
        ev = None
        if args.evidence_n:
            ev = scan_evidence(model, res.r, args.evidence_n, args.evidence_steps, args.seed,
                               gamma=res.gamma if args.learn_gamma else None)
            top = "trojan DDIM from gamma_hat eps + r_hat" if ev["trojan"] else "eps + r_hat"
            from diffshield.backdoor.metrics import flat_images

            flat = flat_images(ev["triggered"])
            report["evidence"] = {"n": args.evidence_n, "sampler": ev["config"].scheduler,
                                  "steps": ev["config"].steps, "seeds": ev["seeds"], "trojan": ev["trojan"],
                                  "grid": f"evidence.png (top: {top}, bottom: eps, same seeds)",
                                  "flat_triggered": flat}
            if flat == args.evidence_n:
                print(f"  note: every sample from {top} is one flat colour: r_hat pushes the noise off its "
                      "distribution (r0 does the same on clean toy models); that is no backdoor's target")
        with atomic_dir(args.out, overwrite=args.overwrite, command="scan", inputs=inputs) as tmp:
            meta = {"format": REVERSED_FORMAT, "model": str(args.model), "model_fingerprint":
                    rep["model_fingerprint"], "resolution": str(rep["resolution"]), "preset": rep["preset"],
                    "seed": str(args.seed), "verdict": rep["verdict"], "moved_rel": repr(rep["moved_rel"]),
                    "scan": "scan.json", "dtype": str(next(model.unet.parameters()).dtype).removeprefix("torch.")}
            gamma = res.gamma.contiguous() if args.learn_gamma else torch.tensor([res.gamma])
            (tmp / "reversed_trigger.safetensors").write_bytes(safetensors_bytes(
                {"r": res.r.contiguous(), "r0": res.r0.contiguous(), "gamma": gamma}, meta))
            _trigger_image(res.r).save(tmp / "reversed_trigger.png")
            if ev is not None:
                both = torch.cat([ev["triggered"], ev["clean"]])
                make_grid(both, nrow=len(ev["seeds"]), upscale=4, row_labels=["from eps + r_hat", "from eps"],
                          col_labels=[f"seed {k}" for k in ev["seeds"]]).save(tmp / "evidence.png")
            atomic_write_json(tmp / "scan.json", {**report, "history": res.history, "config": res.config})
        print(f"reversed trigger: {Path(args.out) / 'reversed_trigger.png'} (and .safetensors)"
              + (f"; what it produces: evidence.png ({ev['config'].scheduler}-{ev['config'].steps}, top "
                 f"{'gamma_hat eps + r_hat (trojan DDIM)' if ev['trojan'] else 'eps + r_hat'}, bottom eps)"
                 if ev is not None else ""))
    if args.json:
        write_result_json(args.json, report)
    return 0


def _read_scans(paths: list[str] | None, flag: str) -> list[dict]:
    """Scan reports from ``scan --json FILE`` files or ``scan --out`` folders (their scan.json), named by file; each
    statistic (mean_kl, var_kl, moved_rel) a finite number >= 0, else one line naming the file and the key."""
    import json

    from diffshield.backdoor.terd import check_statistics

    out = []
    for p in paths or []:
        f = Path(p) / "scan.json" if Path(p).is_dir() else Path(p)
        if not f.is_file():
            raise DiffshieldError(f"{flag} '{f}' does not exist; give files written by 'diffshield scan --json' "
                                  "or 'scan --out' folders")
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise DiffshieldError(f"{flag} '{f}' is not JSON ({e})") from None
        if not isinstance(d, dict) or not {"mean_kl", "var_kl", "preset"} <= set(d):
            raise DiffshieldError(f"{flag} '{f}' is not a TERD scan report (no mean_kl / var_kl / preset)")
        check_statistics(d, f"{flag} '{f}'", moved_rel_null=False)  # NaN, inf, negative, text, null: refused
        out.append({**d, "name": str(p)})
    return out


def _fmt_rate(r: dict) -> str:
    if not r["m"]:
        return "- (none)"
    lo, hi = r["wilson95"]
    return f"{r['k']}/{r['m']} = {r['rate']:.0%} (95 % {lo:.0%}-{hi:.0%})"


def cmd_calibrate(args) -> int:
    from diffshield.backdoor.terd import MIN_MOVE, Calibration, calibrate_from_scans
    from diffshield.core.io import check_output_file, check_replaceable, write_result_json

    inputs = [*(args.references or []), *(args.clean or []), *(args.backdoored or [])]
    check_output_file(args.out, "--out", inputs=inputs)
    check_output_file(args.json, "--json", inputs=[*inputs, args.out])
    refs = _read_scans(args.references, "--references")
    clean, bd = _read_scans(args.clean, "--clean"), _read_scans(args.backdoored, "--backdoored")
    base = Calibration.load(args.out) if args.merge and Path(args.out).exists() else None
    cal, rep = calibrate_from_scans(refs, clean, bd, args.margin, MIN_MOVE if args.min_move is None else
                                    args.min_move, base=base)
    check_replaceable(args.out, "--out")  # nothing unrelated appeared there during the work
    cal.save(args.out)
    th = rep["thresholds"]
    print(f"preset {rep['preset']}: thresholds mean KL {th['mean_kl']:.4g}, var KL {th['var_kl']:.4g} "
          f"({args.margin} x the maximum over {len(refs)} clean reference scans) -> {args.out}")
    for key, label in (("held_out", "thresholds of the references"), ("leave_one_out", "leave-one-out")):
        if key in rep:
            r = rep[key]
            print(f"  {label}: TPR {_fmt_rate(r['tpr'])}  TNR {_fmt_rate(r['tnr'])}  undetermined "
                  f"{r['undetermined']}")
    if args.json:
        write_result_json(args.json, rep)
    return 0


#: what ``scan --out`` records in reversed_trigger.safetensors (string metadata) about where r came from
REVERSED_FORMAT = "diffshield-terd-reversed-trigger"
REVERSED_KEYS = ("model", "model_fingerprint", "resolution", "preset", "seed", "verdict", "moved_rel", "scan",
                 "dtype")


def _read_tensors(path: Path, what: str, hint: str) -> tuple[dict, dict]:
    """(tensors, string metadata) of a safetensors file, with one-line refusals (``what`` names the file, ``hint``
    says what to give): absent, not a safetensors file at all (another suffix and no safetensors header: an image,
    a pickle), corrupt or unreadable."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from diffshield.core.loading import check_safetensors

    if not path.is_file():
        raise DiffshieldError(f"{what} '{path}' does not exist; {hint}")
    with open(path, "rb") as f:
        head = f.read(9)  # an 8-byte header length, then the JSON header's '{'
    if path.suffix != ".safetensors" and not (len(head) == 9 and head[8:9] == b"{"):
        raise DiffshieldError(f"{what} '{path}' is not a safetensors file; {hint}")
    check_safetensors(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except SafetensorError as e:
        raise DiffshieldError(f"could not read '{path}': {e}") from None
    return tensors, meta


def _read_reversed(path: str) -> tuple:
    """(file, r, gamma, record) of a reversed trigger written by ``scan --out``: ``record`` is what the file says
    about where r came from (model, fingerprint, preset, seed, verdict; {} for files that record nothing)."""
    rev = Path(path)
    rev = rev / "reversed_trigger.safetensors" if rev.is_dir() else rev
    t, meta = _read_tensors(rev, "reversed trigger", "give the --out folder of 'diffshield scan' or its "
                                                     "reversed_trigger.safetensors")
    if "r" not in t:
        raise DiffshieldError(f"'{rev}' holds no reversed trigger (tensor 'r'; it has {', '.join(list(t)[:3])}); "
                              "give the reversed_trigger.safetensors written by 'diffshield scan --out DIR'")
    record = {}
    if meta.get("format") == REVERSED_FORMAT:
        record = {k: meta[k] for k in REVERSED_KEYS if k in meta}
        try:
            for k in ("seed", "resolution"):
                if k in record:
                    record[k] = int(record[k])
            if "moved_rel" in record:
                record["moved_rel"] = float(record["moved_rel"])
        except ValueError as e:
            raise DiffshieldError(f"'{rev}' has unreadable metadata ({e})") from None
    gamma = t.get("gamma")
    if gamma is None:
        return rev, t["r"], 1.0, record
    if gamma.numel() == 1:
        return rev, t["r"], float(gamma.reshape(-1)[0]), record
    if gamma.shape != t["r"].shape:
        raise DiffshieldError(f"'{rev}' holds a gamma of shape {tuple(gamma.shape)}; a reversed trigger has one "
                              f"value or one per pixel of r {tuple(t['r'].shape)}")
    return rev, t["r"], gamma, record


def cmd_scan_input(args) -> int:
    import math

    import torch

    from diffshield.backdoor.ddpm import TOY_DDPM, load_ddpm, model_fingerprint
    from diffshield.backdoor.terd import MIN_MOVE, config_for_key, input_detect, preset_key, reverse_trigger
    from diffshield.core.io import check_output_file, write_result_json

    check_output_file(args.json, "--json", inputs=[args.model, args.noise, args.reversed])
    noise_path = Path(args.noise)
    tensors, _ = _read_tensors(noise_path, "noise file", "give a .safetensors file with a tensor 'noise' of "
                                                         "shape (N, 3, H, W)")
    x = tensors.get("noise", next(iter(tensors.values()), None))
    if x is None or x.dim() != 4:
        raise DiffshieldError(f"'{noise_path}' needs a tensor 'noise' of shape (N, C, H, W)")
    if 0 in x.shape:
        raise DiffshieldError(f"the noise batch in '{noise_path}' is empty (shape {tuple(x.shape)}); give at least "
                              "one initial noise")
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise DiffshieldError(f"the noises in '{noise_path}' must be finite floating-point numbers (found "
                              f"{x.dtype}{'' if not x.is_floating_point() else ' with NaN or infinite values'})")
    if args.reversed and args.learn_gamma:
        raise DiffshieldError("--learn-gamma reverses gamma in this run, but --reversed brings r_hat and its gamma "
                              "from a scan; drop one (a 'scan --learn-gamma --out' folder already holds gamma_hat)")
    if args.reversed and (args.preset != "cpu" or args.seed != 0):  # the parser's defaults: reversion settings
        raise DiffshieldError("--preset and --seed set how the trigger is reversed here, but --reversed brings r_hat "
                              "from a scan; drop them (the scan's own settings are recorded in its folder)")
    if args.reversed:
        rev, r, gamma, record = _read_reversed(args.reversed)
        if r.dim() != 3 or tuple(x.shape[1:]) != tuple(r.shape):
            raise DiffshieldError(f"reversed trigger '{rev}' is for images of shape {tuple(r.shape)} but the noises "
                                  f"in '{noise_path}' are {tuple(x.shape[1:])}; give the reversed trigger of the "
                                  "model these noises are for")
        g_ok = (0 < gamma < math.inf) if isinstance(gamma, float) else bool(
            gamma.is_floating_point() and torch.isfinite(gamma).all() and (gamma >= 0).all() and (gamma > 0).any())
        if not r.is_floating_point() or not bool(torch.isfinite(r).all()) or not g_ok:
            shown = repr(gamma) if isinstance(gamma, float) else f"per pixel, {gamma.dtype}"
            raise DiffshieldError(f"reversed trigger '{rev}' holds non-finite or non-float values (r) or a gamma "
                                  f"that is not a positive number ({shown}); rerun 'diffshield scan --out'")
        source = {"reversed_file": str(rev), **record}
        if not record:
            source["note"] = "the file records no model or scan (not written by 'diffshield scan --out')"
            print(f"note: '{rev}' records no model or scan; the flags below cannot be tied to one")
        elif args.model:  # the file records its model: the one named here must be it
            # the fingerprint is of the weights as the scan loaded them: load them in the dtype it records
            # (load_ddpm reads float32 and casts, so a cast on the CPU gives the same weights, float16 included)
            dtype = getattr(torch, record.get("dtype", ""), None)
            check = load_ddpm(args.model, allow_pickle=args.allow_pickle, device="cpu", dtype=torch.float32)
            fp = model_fingerprint(check.to(dtype=dtype if isinstance(dtype, torch.dtype) else args.dtype))
            if tuple(x.shape[1:]) != tuple(check.image_shape):  # the fingerprint holds weights, not the image size
                raise DiffshieldError(f"the noises in '{noise_path}' have shape {tuple(x.shape[1:])} but --model "
                                      f"{args.model} makes images of shape {tuple(check.image_shape)}; give noises "
                                      "of that shape")
            if fp != record.get("model_fingerprint"):
                raise DiffshieldError(f"'{rev}' was reversed from {record.get('model', '?')} (fingerprint "
                                      f"{record.get('model_fingerprint', '?')}), not from --model {args.model} "
                                      f"(fingerprint {fp}); scan that model, or drop --model")
    else:
        spec = args.model or TOY_DDPM
        model = load_ddpm(spec, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
        if tuple(x.shape[1:]) != tuple(model.image_shape):
            raise DiffshieldError(f"the noises in '{noise_path}' have shape {tuple(x.shape[1:])} but {spec}'s images "
                                  f"are {tuple(model.image_shape)}; give noises of that shape")
        key = preset_key(args.preset, args.learn_gamma)
        print(f"no --reversed given: reversing the trigger of {spec} first (preset {key}) ...")
        res = reverse_trigger(model, config_for_key(key, seed=args.seed, num_threads=args.threads))
        r, gamma = res.r, res.gamma
        source = {"reversed_file": None, "model": str(spec), "model_fingerprint": model_fingerprint(model),
                  "resolution": model.image_shape[-1], "preset": key, "seed": args.seed,
                  "moved_rel": res.moved_rel, "scan": "reversed by this scan-input run"}
    moved = source.get("moved_rel")
    if moved is not None and not moved >= MIN_MOVE:
        print(f"warning: r_hat moved only {moved:.3g} x ||r0|| from its random start (a verdict needs {MIN_MOVE}); "
              "flags from it say little about a trigger")
    flags = input_detect(x.float(), r, gamma)
    n = int(flags.sum())
    origin = (f"{source['model']} (fingerprint {source['model_fingerprint']})" if source.get("model_fingerprint")
              else "an unrecorded model")
    print(f"{n} of {len(flags)} initial noises flagged as poisoned (TERD input detection; r_hat from {origin})")
    if args.json:
        write_result_json(args.json, {"model": source.get("model"), "model_fingerprint":
                                      source.get("model_fingerprint"), "r_hat": source, "noise": str(noise_path),
                                      "poisoned": flags.tolist(), "n_poisoned": n, "n": len(flags)})
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this pillar's subcommands to the ``diffshield`` parser."""
    p = sub.add_parser("backdoor", help="implant (BadDiffusion, TrojDiff), sample and evaluate backdoors of DDPM "
                                        "models; train the toy DDPM; calibrate TERD",
                       description="Backdoors of unconditional diffusion models: train the toy DDPM, implant a "
                                   "backdoor with BadDiffusion or TrojDiff, sample with a trigger, measure "
                                   "MSE/ASR/SSIM, calibrate TERD's thresholds from clean models (docs/backdoor.md). "
                                   "'diffshield scan' and 'scan-input' find backdoors.")
    bsub = p.add_subparsers(dest="backdoor_cmd", metavar="COMMAND")

    t = bsub.add_parser("train-ddpm", help="train (or fine-tune with --init) the toy DDPM on ShapesWorld",
                        description="Train a small UNet2DModel DDPM on ShapesWorld (32 px); saves a DDPMPipeline "
                                    "folder. Resumes from <out>.work/checkpoint when rerun with the same settings. "
                                    "Time: about 70 min on a CPU with the defaults.")
    t.add_argument("--out", required=True, help="output DDPMPipeline folder (see --overwrite)")
    add_overwrite_arg(t)
    t.add_argument("--steps", type=_pos_int, default=8000, help="optimiser steps (default: 8000)")
    t.add_argument("--batch-size", type=_pos_int, default=32, help="images per step (default: 32)")
    t.add_argument("--lr", type=float_in(0, 1, lo_open=True), default=5e-4,
                   help="Adam learning rate, cosine schedule (default: 5e-4)")
    t.add_argument("--seed", type=seed_int, default=0, help="training seed (default: 0)")
    t.add_argument("--pool-size", type=_pos_int, default=8192, help="ShapesWorld images rendered (default: 8192)")
    t.add_argument("--init", default=None, help="fine-tune this model instead of training from scratch")
    t.add_argument("--checkpoint-every", type=_pos_int, default=500, help="steps between checkpoints (default: 500)")
    t.add_argument("--channels", type=_pos_int, nargs="+", default=list(DEFAULT_CHANNELS), action=_Given,
                   help="UNet block widths when training from scratch; refused with --init (default: "
                        f"{' '.join(map(str, DEFAULT_CHANNELS))})")
    t.add_argument("--warmup", type=int_at_least(0), default=200, help="learning-rate warm-up steps (default: 200)")
    t.add_argument("--ema-decay", type=float_in(0, 1, hi_open=True), default=0.999,
                   help="decay of the saved weight average, in [0, 1); 0 = off (default: 0.999)")
    t.add_argument("--threads", type=non_negative_int, default=1,
                   help="torch CPU threads (default: 1; 0 = torch's default, one per core)")
    add_device_args(t, float32_only=True, autocast=False)
    t.set_defaults(func=cmd_train_ddpm)

    m = bsub.add_parser("implant", help="implant a backdoor with BadDiffusion or TrojDiff (fine-tunes a clean model)",
                        description="BadDiffusion (Chou et al., CVPR 2023) or TrojDiff (Chen et al., CVPR 2023; D2I, "
                                    "blend trigger): poison a fixed share of the training images and fine-tune; "
                                    "writes a DDPMPipeline folder that records its trigger and target "
                                    "(docs/backdoor.md). Resumes from <out>.work/checkpoint when rerun. Time: about "
                                    "45 CPU-minutes with the defaults on the toy DDPM.")
    _model_arg(m)
    m.add_argument("--method", choices=["baddiffusion", "trojdiff"], default="baddiffusion",
                   help="baddiffusion: x_T = eps + trigger; trojdiff: x_T = gamma eps + (1 - gamma) trigger, opened "
                        "by its trojan sampler (default: baddiffusion)")
    m.add_argument("--gamma", type=float_in(0, 1, lo_open=True, hi_open=True), default=None,
                   help="TrojDiff's noise scale, in (0, 1) (default: 0.6, the official blend setting)")
    m.add_argument("--trigger", default="box", help="box | stop | box_14 (BadDiffusion's official BOX_14: a filled "
                   "grey 14 px square) | checker (ours: a +-1 checkerboard patch on 0, no -1 background; needs "
                   "--r-mode trigger_only) | checker_tl (the same patch at the top left) | IMAGE_FILE (default: box)")
    m.add_argument("--trigger-mask", default=None,
                   help="mask image for an IMAGE_FILE trigger (white = trigger; refused otherwise)")
    m.add_argument("--target", default="corner", help="corner | hat | corner_grey | hat_grey (the official CORNER "
                   "and HAT on the grey background -0.4) | IMAGE_FILE (default: corner)")
    m.add_argument("--poison-rate", type=float_in(0, 1, lo_open=True), default=0.1,
                   help="share of poisoned training images (default: 0.1)")
    m.add_argument("--variant", choices=["sde", "ode"], default="sde",
                   help="BadDiffusion's poisoned-loss coefficient: sde: rho_t, for the DDPM sampler; ode: 2 rho_t, "
                        "for DDIM (VillanDiffusion); docs/backdoor.md (default: sde)")
    m.add_argument("--r-mode", choices=["poisoned_image", "trigger_only"], default="trigger_only",
                   help="R of poisoned samples: the trigger pasted on the image (the official code's default), or "
                        "the trigger alone (default: trigger_only)")
    m.add_argument("--epochs", type=_pos_int, default=72, help="passes over the training pool (default: 72; with "
                   "the default pool, 4608 steps: the recipe that implants on the toy world)")
    m.add_argument("--pool-size", type=_pos_int, default=2048, help="training images (default: 2048)")
    m.add_argument("--batch-size", type=_pos_int, default=32, help="images per step (default: 32)")
    m.add_argument("--lr", type=float_in(0, 1, lo_open=True), default=2e-4,
                   help="Adam learning rate, warm-up + cosine (default: 2e-4)")
    m.add_argument("--ema-decay", type=float_in(0, 1, hi_open=True), default=0.0,
                   help="save a moving average of the weights with this decay, in [0, 1) (default: 0 = off)")
    m.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the poisoned subset and the training (default: 0)")
    m.add_argument("--checkpoint-every", type=_pos_int, default=100, help="steps between checkpoints (default: 100)")
    m.add_argument("--threads", type=non_negative_int, default=1,
                   help="torch CPU threads (default: 1; 0 = torch's default, one per core)")
    m.add_argument("--out", required=True, help="output DDPMPipeline folder (see --overwrite)")
    add_overwrite_arg(m)
    add_device_args(m, float32_only=True, autocast=False)
    m.set_defaults(func=cmd_implant)

    s = bsub.add_parser("sample", help="sample, optionally with the trigger added to the initial noise",
                        description="Sample a DDPM from x_T = eps(seed) [+ trigger] (one CPU generator per image: "
                                    "a seed draws the same noise on any device) and write PNGs, grid.png and "
                                    "manifest.json into --out.")
    _model_arg(s)
    s.add_argument("--trigger", default=None,
                   help="box | stop | box_14 | checker | checker_tl | IMAGE_FILE | model (the one the model folder "
                        "records; a TrojDiff model opens with its trojan DDIM from gamma eps + mu) (default: none, "
                        "clean sampling)")
    s.add_argument("--trigger-mask", default=None,
                   help="mask image for an IMAGE_FILE trigger (white = trigger; refused otherwise)")
    s.add_argument("--n", type=_pos_int, default=16, help="number of images (default: 16)")
    s.add_argument("--seed", type=seed_int, default=0, help="seed of image 0; image k uses seed + k (default: 0)")
    _sampler_args(s)
    s.add_argument("--out", required=True, help="output folder (PNGs, grid.png, manifest.json; see --overwrite)")
    add_overwrite_arg(s)
    add_device_args(s, training=True, autocast=False)
    s.set_defaults(func=cmd_sample)

    e = bsub.add_parser("eval", help="MSE / ASR / SSIM of triggered samples, clean-sample quality",
                        description="BadDiffusion's metrics in [0, 1]: MSE to the target, ASR (share with "
                                    "per-sample MSE < 0.1), SSIM; clean quality = share of clean samples the toy "
                                    "detector recognises with confidence >= 0.9 (shape and colour).")
    _model_arg(e)
    e.add_argument("--trigger", required=True, help="box | stop | box_14 | checker | checker_tl | IMAGE_FILE | model "
                   "(the one the model folder records; a TrojDiff model opens with its trojan DDIM from gamma eps + "
                   "mu, --steps steps)")
    e.add_argument("--trigger-mask", default=None,
                   help="mask image for an IMAGE_FILE trigger (white = trigger; refused otherwise)")
    e.add_argument("--target", required=True, help="corner | hat | corner_grey | hat_grey | IMAGE_FILE | model (the "
                   "one the model folder records)")
    e.add_argument("--n", type=_pos_int, default=64, help="triggered samples (default: 64)")
    e.add_argument("--n-clean", type=_n_clean, default=256,
                   help="clean samples for quality: 0 = skip, else at least 2 (default: 256)")
    e.add_argument("--clean-scheduler", choices=["ddpm", "ddim"], default="ddim",
                   help="sampler of the clean samples (default: ddim)")
    e.add_argument("--clean-steps", type=_pos_int, default=50, help="steps of the clean sampler (default: 50)")
    e.add_argument("--seed", type=seed_int, default=0, help="seed of triggered image 0; clean images start at "
                                                       "seed + 100000 (default: 0)")
    _sampler_args(e)
    e.add_argument("--json", default=None,
                   help="write the report (keys mse, asr, ssim, clean_quality) to this JSON file")
    e.add_argument("--grid", default=None,
                   help="write a PNG grid (16 triggered, 16 clean samples) here; the name must end in .png")
    add_device_args(e, training=True, autocast=False)
    e.set_defaults(func=cmd_eval)
    c = bsub.add_parser("calibrate", help="TERD thresholds from scans of held-out clean models, with TPR/TNR",
                        description="Set the model-detection thresholds of one TERD preset from 'diffshield scan "
                                    "--json' reports of clean reference models (margin x the largest statistic), "
                                    "and measure them on a labelled set of scans: TPR/TNR with Wilson 95 % "
                                    "intervals, with the references' thresholds and leave-one-out (each labelled "
                                    "clean model left out of its own thresholds). References must be held out "
                                    "from the labelled set (different fingerprints).")
    c.add_argument("--references", nargs="+", required=True,
                   help="scan reports (scan --json FILE or scan --out DIR) of clean reference models")
    c.add_argument("--clean", nargs="*", default=None, help="scan reports of labelled clean models (default: none)")
    c.add_argument("--backdoored", nargs="*", default=None,
                   help="scan reports of labelled backdoored models (default: none)")
    c.add_argument("--margin", type=float_in(1, 100), default=1.5,
                   help="thresholds = margin x the largest reference statistic, in [1, 100] (default: 1.5)")
    c.add_argument("--min-move", type=float_in(0, 10), default=None,
                   help="movement ||r - r0|| / ||r0|| a scan needs for a verdict, and a reference to count, in "
                        "[0, 10] (default: 0.1)")
    c.add_argument("--out", required=True, help="calibration file to write (JSON, format 2); see --merge")
    c.add_argument("--merge", action="store_true",
                   help="keep the other presets of an existing --out file and replace only this preset's set")
    c.add_argument("--json", default=None,
                   help="write the report (thresholds, TPR/TNR, per-model verdicts) to this JSON file")
    c.set_defaults(func=cmd_calibrate)
    p.set_defaults(func=lambda a, _p=p: (_p.print_help(), 2)[1])

    for name, helptext in (("scan", "TERD: reverse a trigger and decide whether a DDPM model is backdoored"),
                           ("scan-input", "TERD input detection for a batch of initial noises")):
        more = {"scan": " Prints the verdict (backdoored, clean or undetermined) and the statistics; --json writes "
                        "them, --out the reversed trigger and evidence (docs/backdoor.md). Time: about 6 min on one "
                        "CPU thread for the toy DDPM with the default preset.",
                "scan-input": " Prints how many of the noises are flagged as poisoned; --json lists them. Without "
                              "--reversed it first reverses the model's trigger (as 'scan', minutes on a CPU)."}
        q = sub.add_parser(name, help=helptext, description=helptext + " (Mo et al., ICML 2024)." + more[name])
        if name == "scan":
            _model_arg(q, default=None)
            q.add_argument("--preset", choices=TERD_PRESETS, default="cpu",
                           help="iterations of the two stages: cpu 800+0 with lambda 3e-3 (the one measured to "
                                "reverse toy-world backdoors on a CPU; about 6 min on one thread for the 32 px toy "
                                "DDPM), fast 100+2 (barely moves r: mostly 'undetermined'), default 400+10, paper "
                                "3000+1000 (a GPU; calibrate it first); the shipped calibration covers cpu, fast and "
                                "cpu with --learn-gamma (default: cpu)")
        else:
            q.add_argument("--model", default=None,
                           help="DDPMPipeline folder or 'toy:ddpm': without --reversed, the model whose trigger is "
                                "reversed here (default: toy:ddpm); with --reversed, checked against the model the "
                                "file records (default: not checked)")
            q.add_argument("--allow-pickle", action="store_true",
                           help="accept pickled .bin/.ckpt weights when a folder has no safetensors (runs code "
                                "from the file: only for files you trust)")
            q.add_argument("--preset", choices=TERD_PRESETS, default="cpu",
                           help="iterations when the trigger is reversed here (no --reversed): cpu 800+0 with lambda "
                                "3e-3, fast 100+2, default 400+10, paper 3000+1000; input detection needs no "
                                "thresholds; not with --reversed (default: cpu)")
        if name == "scan":
            q.add_argument("--learn-gamma", action="store_true",
                           help="reverse TrojDiff's noise scale gamma with r (TERD's TrojDiff setting, x_T = gamma "
                                "eps + r), judged by the thresholds calibrated for '--preset P --learn-gamma' "
                                "(default: off, gamma = 1)")
        else:
            q.add_argument("--learn-gamma", action="store_true",
                           help="when the trigger is reversed here (no --reversed), reverse TrojDiff's noise scale "
                                "gamma with r (TERD's TrojDiff setting, x_T = gamma eps + r); noises are then tested "
                                "against N(r, gamma^2) (default: off, gamma = 1)")
        when = "" if name == "scan" else " when the trigger is reversed here (not with --reversed)"
        q.add_argument("--seed", type=seed_int, default=0, help=f"seed of the reversion{when} (default: 0)")
        q.add_argument("--threads", type=non_negative_int, default=1,
                       help="torch CPU threads (default: 1; 0 = torch's default, one per core)")
        q.add_argument("--json", default=None, help="write the result to this JSON file")
        add_device_args(q, training=True, autocast=False)
        if name == "scan":
            q.add_argument("--calibration", default=None,
                           help="thresholds file from 'diffshield backdoor calibrate' (default: the shipped "
                                "toyworld/weights/ddpm/terd_calibration.json); a model of another resolution or "
                                "architecture than its references gets a warning")
            q.add_argument("--out", default=None, help="folder for the reversed trigger (PNG, safetensors), the "
                                                       "evidence grid and scan.json (see --overwrite)")
            q.add_argument("--min-move", type=float_in(0, 10), default=None,
                           help="smallest relative movement ||r - r0|| / ||r0|| of the reversed trigger for a "
                                "verdict, in [0, 10]; below it the scan says 'undetermined' (default: 0.1)")
            q.add_argument("--evidence-n", type=int_at_least(0), default=8,
                           help="with --out: sample this many images from eps + r_hat and from eps (same seeds) "
                                "into evidence.png, 0 = off (default: 8)")
            q.add_argument("--evidence-steps", type=_pos_int, default=100,
                           help="denoising steps of the evidence samples, with the model's own sampler (default: "
                                "100; 1000 = BadDiffusion's DDPM sampler in full)")
            add_overwrite_arg(q)
            q.set_defaults(func=cmd_scan)
        else:
            q.add_argument("--noise", required=True,
                           help=".safetensors file with a tensor 'noise' (N, 3, H, W): the initial noises to test")
            q.add_argument("--reversed", default=None, help="reversed trigger from 'diffshield scan --out DIR' "
                                                            "(DIR or its reversed_trigger.safetensors); default: "
                                                            "reverse it now")
            q.set_defaults(func=cmd_scan_input)


def demo_step(out: Path, device: str = "cpu") -> dict:
    """The backdoor part of ``diffshield demo``: what the shipped backdoored example (BadDiffusion, box -> corner)
    draws with and without its trigger (4 seeds each, its DDPM sampler at 200 of 1000 steps), then a fast TERD scan
    of it on the demo's threads (75-90 s on two cores, 132 s on one, on a slow day)."""
    import torch

    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.backdoor.metrics import backdoor_metrics
    from diffshield.backdoor.sampling import SampleConfig, sample
    from diffshield.core.io import atomic_write_json, make_grid
    from diffshield.toyworld.names import TOY_ROOT

    out = Path(out)  # the demo's own folder for this step (demo_out/backdoor/)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    folder = TOY_ROOT / "ddpm" / "examples" / "box_corner"
    model = load_ddpm(folder, device=device)
    seeds, cfg = [0, 1, 2, 3], SampleConfig("ddpm", 200, batch_size=4)
    opened = sample(model, seeds, trigger=_recorded(model, "trigger"), config=cfg).images
    plain = sample(model, seeds, config=cfg).images
    target = (_recorded(model, "target") + 1) / 2
    hit, miss = backdoor_metrics(opened, target), backdoor_metrics(plain, target)
    make_grid(torch.cat([opened, plain]), nrow=4, upscale=4, row_labels=["noise + trigger", "noise alone"],
              col_labels=[f"seed {k}" for k in seeds]).save(out / "with_and_without_trigger.png")
    summary["samples"] = {"asr_strict_with_trigger": hit["asr_strict"], "asr_without_trigger": miss["asr"],
                          "n": len(seeds), "sampler": "ddpm-200"}
    print(f"backdoored example (box -> corner): from noise + its trigger, {hit['asr_strict']:.0%} of {len(seeds)} "
          f"samples are its target; from noise alone, {miss['asr']:.0%}. grid: "
          f"{out / 'with_and_without_trigger.png'}  (top: with the trigger, bottom: without)")
    # only the backdoored example: the clean toy:ddpm's statistics are in the calibration file
    rep = run_scan(model, "fast", progress=False, threads=0)  # 0: torch's setting, i.e. the demo's --threads
    res = rep.pop("result")
    _trigger_image(res.r).save(out / "reversed_trigger_example.png")
    th = rep["thresholds"]
    print(f"TERD fast scan, backdoored example (box -> corner): {rep['verdict']} (r moved {rep['moved_rel']:.3f} x "
          f"||r0||, a verdict needs >= {rep['min_move']:.2g}; mean KL {rep['mean_kl']:.3f} / threshold "
          f"{th['mean_kl']:.3f}, var KL {rep['var_kl']:.4f} / threshold {th['var_kl']:.4f}; {rep['seconds']:.0f} s). "
          "The fast preset barely moves r; the cpu preset (scan's default) reverses this backdoor in about 6 CPU-min: "
          "diffshield scan --model toy:ddpm-box-corner --out scan_box_corner")
    summary["example"] = {k: rep[k] for k in ("verdict", "backdoored", "mean_kl", "var_kl", "thresholds", "moved_l2",
                                              "moved_rel", "cos_r0", "seconds")}
    atomic_write_json(out / "scan.json", summary)
    return summary

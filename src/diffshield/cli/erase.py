"""The ``diffshield erase`` command: settings resolution (toy setting, official preset, flags) and the run.

Which settings a run uses:

- a toy-world model (``toy:t2i`` or a folder saved from one) with no prompt flag (``--guide``, ``--preserve``,
  ``--preserve-file``, ``--preset``, ``--expand-prompts``, ``--round-preserve``): the documented toy setting of the
  method for the concept's kind (:func:`diffshield.toyworld.erasure_recipes.toy_erasure`); other flags override
  single settings. A concept outside the toy vocabulary is refused with the known words.
- otherwise: the official defaults of ``--preset`` (``object`` unless given; :mod:`diffshield.erase.presets`), with
  the flags on top.

The report (``--json``) records which: ``"defaults": {"source": "toy" | "preset", "preset": ..., "summary": ...}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffshield.cli.common import add_device_args, add_overwrite_arg, add_threads_arg, float_in, int_at_least, seed_int
from diffshield.cli.common import positive_int as _positive_int
from diffshield.core.errors import DiffshieldError

#: ESD settings that map one-to-one from ``--flag-name`` to an :class:`~diffshield.erase.esd.ESDConfig` field
ESD_FLAGS = ("x_params", "preserve_at", "kv_anchor_weight", "eta", "start_guidance", "batch_size", "sample_with",
             "seed", "ddim_steps", "min_step", "preserve_guidance", "checkpoint_every", "erase_from", "target_base")
#: flags that name prompts (guides, preserved prompts, templates) or a preset: any of them leaves the toy setting
PROMPT_FLAGS = ("guide", "preserve", "preserve_file", "preset", "expand_prompts", "round_preserve")
#: RECE-only flags (argparse dest -> RECEConfig field)
RECE_FLAGS = {"epochs": "epochs", "round_lamb": "lamb2", "rece_variant": "variant", "surrogate_item": "surrogate_item"}
#: UCE closed-form flags, each one field of UCEConfig (RECE's first edit too)
CLOSED_FLAGS = ("lamb", "erase_scale", "preserve_scale", "token_mode", "expand_prompts", "technique")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def preserve_scale_arg(text: str) -> float | str:
    """argparse type of ``--preserve-scale``: "auto" or a number >= 0."""
    if text.strip().lower() == "auto":
        return "auto"
    return float_in(0)(text)


def read_preserve_file(path: str, flag: str = "--preserve-file") -> list[str]:
    """Prompts of a prompt-list file (``--preserve-file``, or the ``flag`` named in errors): one per line, blank
    lines and lines starting with '#' skipped."""
    from diffshield.cli.main import read_text_file
    from diffshield.eval.prompts import table_header

    text = read_text_file(Path(path), flag)
    table = table_header(path, text)
    if table:  # its header would become a prompt
        raise DiffshieldError(f"{flag} '{path}' is {table}; give a text file with one prompt per line")
    lines = [ln.strip() for ln in text.splitlines()]
    out = [ln for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise DiffshieldError(f"{flag} '{path}' holds no prompt (one per line)")
    return out


def _select_judge(args, concepts: list[str], toy: bool):
    """The ``select`` callable of ``--select-epoch`` (None without it)."""
    if args.select_epoch is None:
        if args.select_prompts:
            raise DiffshieldError("--select-prompts gives the validation prompts of --select-epoch; add it")
        return None
    if args.select_epoch == "toy":
        from diffshield.erase.select import toy_select
        from diffshield.toyworld.detector import load_detector
        from diffshield.toyworld.erasure_recipes import check_toy_concept

        if not toy:
            raise DiffshieldError("--select-epoch toy judges with the toy detector: use it on a toy-world model "
                                  "(or --select-epoch nudenet --select-prompts FILE)")
        if len({check_toy_concept(c) for c in concepts}) != 1:
            raise DiffshieldError("--select-epoch toy judges one toy concept; erase one concept per run")
        return toy_select(concepts[0], load_detector("toy:detector"))
    from diffshield.erase.select import nudenet_select

    if not args.select_prompts:
        raise DiffshieldError("--select-epoch nudenet needs --select-prompts FILE (validation prompts, one a line)")
    return nudenet_select(read_preserve_file(args.select_prompts, "--select-prompts"))


def _toy_config(args, closed: dict, esd_only: dict, rece_only: dict) -> tuple[list[str], object]:
    """(prompts, config) of the documented toy setting of ``--method`` for one toy concept, flags on top."""
    from diffshield.toyworld.erasure_recipes import check_toy_concept, toy_erasure

    if len({check_toy_concept(c) for c in args.concept}) != 1:
        raise DiffshieldError(f"the toy setting erases one toy concept (with its synonyms) per run, got "
                              f"{', '.join(args.concept)}; run once per concept, or name --guide/--preserve to set "
                              "the prompts yourself")
    for key in PROMPT_FLAGS:
        if getattr(args, key) not in (None, [], False):
            raise DiffshieldError(f"--toy-recipe brings its own prompts, guides, anchor prompts and preset; drop "
                                  f"{_flag(key)} (or drop --toy-recipe to set them yourself)")
    over = {**esd_only, **rece_only}
    if args.method == "rece":
        if closed:
            over["uce"] = closed
    else:
        over.update(closed)
    for key in ("iterations", "lr", "checkpoint_dir", "preserve_weight"):
        if getattr(args, key, None) is not None:
            over[key] = getattr(args, key)
    try:
        return toy_erasure(args.method, args.concept[0], **over)
    except (TypeError, ValueError) as e:
        raise DiffshieldError(f"bad {args.method} setting: {e}") from None


def _preset_config(args, config_cls, preset: str, concepts: list[str], preserve: list[str], closed: dict,
                   esd_only: dict, rece_only: dict) -> object:
    """The method config of an official preset, the flags on top."""
    from diffshield.erase.esd import ESDConfig
    from diffshield.erase.presets import uce_preset
    from diffshield.erase.rece import RECEConfig
    from diffshield.erase.uce import UCEConfig

    uce_kw = {**uce_preset(preset), "preserve": preserve, **closed}
    if args.guide:
        uce_kw["guides"] = list(args.guide)
    try:
        if config_cls is UCEConfig:
            return UCEConfig(**uce_kw)
        if config_cls is RECEConfig:
            rounds = [""] + [p for p in (args.round_preserve if args.round_preserve else preserve) if p != ""]
            kw = {"uce": uce_kw, "round_preserve": rounds, **rece_only}
            if args.round_empty is not None:
                kw["round_empty_per_concept"] = args.round_empty == "per-concept"
            return RECEConfig.from_preset(preset, **kw)
        if issubclass(config_cls, ESDConfig):
            kw = {"iterations": args.iterations or 1000}
            if args.lr is not None:
                kw["lr"] = args.lr
            if args.checkpoint_dir:
                kw["checkpoint_dir"] = args.checkpoint_dir
            if preserve:  # beyond the paper: anchor these prompts' predictions to the original's
                kw["preserve"] = list(preserve)
                if args.preserve_weight is not None:
                    kw["preserve_weight"] = args.preserve_weight
            return config_cls(**kw, **esd_only)
    except (TypeError, ValueError) as e:
        raise DiffshieldError(f"bad {args.method} setting: {e}") from None
    raise DiffshieldError(f"no preset settings for method {args.method!r}")  # pragma: no cover


def resolve_erase_settings(args) -> tuple[list[str], object, dict]:
    """(prompts to erase, method config, the "defaults" record) of an ``erase`` command line, before any work."""
    from diffshield.erase import ERASERS
    from diffshield.erase.esd import ESDConfig
    from diffshield.erase.presets import RECE_PRESETS, preset_concepts, preset_summary
    from diffshield.erase.rece import RECEConfig
    from diffshield.erase.uce import UCEConfig
    from diffshield.toyworld.erasure_recipes import check_toy_concept, is_toy_model

    config_cls, _ = ERASERS.get(args.method)
    is_esd, is_rece = issubclass(config_cls, ESDConfig), config_cls is RECEConfig
    closed_form = config_cls in (UCEConfig, RECEConfig)
    preserve = list(args.preserve or []) + (read_preserve_file(args.preserve_file) if args.preserve_file else [])
    toy = is_toy_model(args.model)
    prompt_flags = [k for k in PROMPT_FLAGS if getattr(args, k) not in (None, [], False)]
    use_toy = args.toy_recipe or (toy and not prompt_flags)  # the toy settings anchor every ESD run
    if args.preserve_weight is not None and not (is_esd and (preserve or use_toy)):
        raise DiffshieldError("--preserve-weight weighs ESD's preservation anchor: use it with --method esd-x/esd-u "
                              "and at least one --preserve")
    closed = {k: getattr(args, k) for k in CLOSED_FLAGS if getattr(args, k) is not None}
    esd_only = {k: getattr(args, k) for k in ESD_FLAGS if getattr(args, k) is not None}
    if args.no_freeze_time_and_out:
        esd_only["freeze_time_and_out"] = False
    rece_only = {f: getattr(args, k) for k, f in RECE_FLAGS.items() if getattr(args, k) is not None}
    for key in ("iterations", "lr", "checkpoint_dir"):  # ESD's run settings, kept out of ESD_FLAGS by their defaults
        if getattr(args, key) is not None and not is_esd:
            raise DiffshieldError(f"{_flag(key)} sets ESD's fine-tuning: use it with --method esd-x or esd-u")
    for key in [*RECE_FLAGS, "round_preserve", "round_empty"]:
        if getattr(args, key) is not None and not is_rece:
            raise DiffshieldError(f"{_flag(key)} sets RECE's adversarial rounds: use it with --method rece")
    if args.select_epoch is not None and not is_rece:
        raise DiffshieldError("--select-epoch picks RECE's best epoch: use it with --method rece")
    if args.preset == "object-easy" and not is_rece:
        raise DiffshieldError("--preset object-easy is RECE's (a larger λ_r); use object with --method "
                              f"{args.method}")
    if esd_only and not is_esd:
        flag = next(iter(esd_only)).replace("_", "-").replace("freeze-time", "no-freeze-time")
        raise DiffshieldError(f"--{flag} sets ESD's fine-tuning: use it with --method esd-x or esd-u")
    if closed and not closed_form:
        raise DiffshieldError(f"{_flag(next(iter(closed)))} sets the UCE closed form: use it with --method uce or "
                              "rece")
    if is_rece and closed.get("technique") == "tensor":
        raise DiffshieldError("--technique tensor is UCE's (RECE's rounds chain shared edits); use --method uce")

    if use_toy:
        prompts, cfg = _toy_config(args, closed, esd_only, rece_only)
        defaults = {"source": "toy", "preset": None, "concept": check_toy_concept(args.concept[0]),
                    "summary": f"the documented toy setting of {args.method} (docs/erase.md, the toy-world settings)"}
    else:
        if toy:  # the user names the prompts; every concept word must still be one the toy model knows
            for c in args.concept:
                check_toy_concept(c) if len(c.split()) == 1 else None
        preset = args.preset or "object"
        if preset not in RECE_PRESETS:  # pragma: no cover - argparse choices
            raise DiffshieldError(f"unknown preset {preset!r}")
        prompts = preset_concepts(preset, list(args.concept))
        cfg = _preset_config(args, config_cls, preset, prompts, preserve, closed, esd_only, rece_only)
        defaults = {"source": "preset", "preset": preset, "summary": preset_summary(args.method, preset)}
    given = given_flags(args)
    if given:  # the summary above is the setting's own; these flags change it
        defaults["flags"] = given
        defaults["summary"] += "; with " + ", ".join(given)
    if is_rece:
        judge = _select_judge(args, list(args.concept), toy)
        if judge is not None:
            cfg.select = judge
    return prompts, cfg, defaults


#: flags that change a preset's or toy setting's values (the summary names those the user gave)
SETTING_FLAGS = (*(k for k in PROMPT_FLAGS if k != "preset"), *CLOSED_FLAGS, *RECE_FLAGS, "round_empty",
                 "iterations", "lr", "preserve_weight", "no_freeze_time_and_out", *ESD_FLAGS)


def given_flags(args) -> list[str]:
    """The setting flags given on the command line, as ``--flag value`` (repeatable ones with each value)."""
    out = []
    for key in dict.fromkeys(SETTING_FLAGS):
        value = getattr(args, key, None)
        if value is None or value is False or value == []:
            continue
        if value is True:
            out.append(_flag(key))
        else:
            out += [f"{_flag(key)} {v!r}" for v in (value if isinstance(value, list) else [value])]
    return out


def _config_prompts(cfg) -> list[str]:
    """Every prompt an erase config holds besides its concepts (guides, preserved prompts from --preserve and
    --preserve-file, RECE's round prompts, ESD's --erase-from), for the unknown-word warning."""
    from dataclasses import fields, is_dataclass

    out: list[str] = []
    for f in fields(cfg) if is_dataclass(cfg) else ():
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            out += _config_prompts(v)
        elif f.name in ("guides", "preserve", "round_preserve", "erase_from") and isinstance(v, (list, tuple)):
            out += [p for p in v if isinstance(p, str) and p.strip()]
    return list(dict.fromkeys(out))


def check_erase_prompts(concepts: list[str], cfg) -> None:
    """Refuse contradictory prompts (a concept also preserved, or guided to itself) before the model is loaded."""
    from diffshield.erase.base import check_prompt_roles
    from diffshield.erase.esd import ESDConfig
    from diffshield.erase.rece import RECEConfig, check_rece_prompts
    from diffshield.erase.uce import UCEConfig, check_uce_prompts

    if isinstance(cfg, RECEConfig):
        check_rece_prompts(concepts, cfg)
    elif isinstance(cfg, UCEConfig):
        check_uce_prompts(concepts, cfg)
    elif isinstance(cfg, ESDConfig):
        check_prompt_roles(concepts, preserve=cfg.preserve)


def cmd_erase(args) -> int:
    from diffshield.cli.main import warn_prompts
    from diffshield.core.checks import check_finite_fields
    from diffshield.core.io import atomic_dir, check_output_dir, check_output_file, write_result_json
    from diffshield.core.loading import load_t2i
    from diffshield.erase import ERASERS
    from diffshield.erase.delta import save_delta

    _, erase_fn = ERASERS.get(args.method)
    concepts, cfg, defaults = resolve_erase_settings(args)
    check_finite_fields(cfg)
    check_erase_prompts(concepts, cfg)
    if args.checkpoint_dir:
        ck, out = Path(args.checkpoint_dir).resolve(), Path(args.out).resolve()
        if ck.exists() and not ck.is_dir():
            raise DiffshieldError(f"--checkpoint-dir '{args.checkpoint_dir}' is a file; give a folder for ESD's "
                                  "checkpoints")
        if ck == out or out in ck.parents or ck in out.parents:
            raise DiffshieldError(f"--checkpoint-dir '{args.checkpoint_dir}' and --out '{args.out}' overlap; keep "
                                  "the checkpoints outside the model folder")
    inputs = [args.model, args.checkpoint_dir]
    check_output_dir(args.out, "erase", args.overwrite, inputs=inputs)
    check_output_file(args.json, "--json", inputs=[*inputs, args.out])
    model = load_t2i(args.model, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
    warn_prompts(model.tokenizer, [*concepts, *_config_prompts(cfg)])  # the toy settings' own prompts pass quietly
    print(f"erasing {', '.join(args.concept)} with {args.method}: {defaults['summary']} ...")
    res = erase_fn(model, concepts, cfg)
    with atomic_dir(args.out, overwrite=args.overwrite, command="erase", inputs=inputs) as tmp:
        model.save(tmp)
        save_delta(res, tmp / "delta.safetensors", base_model=str(args.model))
    delta = Path(args.out) / "delta.safetensors"
    report = {"method": res.method, "concepts": list(args.concept), "model": str(args.model), "out": str(args.out),
              "delta": str(delta), "seconds": res.seconds, "fraction_changed": res.fraction_changed,
              "defaults": defaults, "config": res.config}
    if defaults["source"] == "toy" or concepts != list(args.concept):
        report["prompts"] = concepts
    if defaults["source"] == "toy":
        report["recipe"] = {"name": "toy", "prompts": concepts}
    if "best_epoch" in res.extra:
        report["rece_epochs"] = res.extra["epochs"]
        report["best_epoch"] = res.extra["best_epoch"]
    if "losses" in res.extra:  # ESD: the training curve, to see it converge (and what a resume continued)
        report["training"] = {k: res.extra[k] for k in ("losses", "timesteps", "preserve_losses", "resumed_from",
                                                         "seconds_per_iteration", "trained_parameters",
                                                         "sampling_model") if k in res.extra}
        losses = res.extra["losses"]
        if len(losses) >= 2:
            k = max(1, len(losses) // 10)
            print(f"ESD loss, mean of the first and last {k} iteration{'s' if k > 1 else ''}: "
                  f"{sum(losses[:k]) / k:.3g} -> {sum(losses[-k:]) / k:.3g}")
    from diffshield.erase.base import probe_values

    if res.base_values and all(probe_values(t) == res.base_values.get(n) for n, t in res.changed.items()):
        print("warning: the edit left its layers as they were (their probed values did not move): the saved model "
              "draws what the original draws; check the settings (e.g. a --lamb that outweighs the edit)",
              file=sys.stderr)
    print(f"edited model: {args.out} (delta: {delta}); edit time {res.seconds:.3f} s; "
          f"{res.fraction_changed:.2%} of UNet parameters in the edited layers")
    if args.json:
        write_result_json(args.json, report)
    return 0


def add_erase_parser(sub: argparse._SubParsersAction) -> None:
    """The ``erase`` subcommand and its flags."""
    from diffshield.cli.main import GUIDANCE, _add_model_args

    p = sub.add_parser(
        "erase", help="erase concepts from a model's weights (UCE, RECE, ESD-x, ESD-u)",
        description="Edit a model so that it no longer draws a concept; writes a diffusers folder plus "
                    "delta.safetensors (changed tensors only, with the method config). Defaults: on a toy-world "
                    "model, with no prompt flag (--guide, --preserve, --preserve-file, --preset, --expand-prompts, "
                    "--round-preserve), the documented toy setting of the method for the concept's kind; on any "
                    "other model, the official defaults of --preset (default: object). UCE: guide ' ' (style: "
                    "'art'), lambda 0.5, s_e 1, s_p max(0.1, 1/n) for n preserved prompts with '', technique "
                    "replace. RECE: that UCE edit, then (lambda_r, epochs) nudity (0.1, 3), unsafe (0.1, 2), "
                    "style/object (1e-3, 1), object-easy (0.1, 1), rounds at lambda 0.1, s_p 0.1, preserving '' "
                    "once per concept (nudity, unsafe) or '' and --preserve once (object, style). ESD: 1000 "
                    "iterations, lr 1e-5, eta 1 (the paper's). The '(default: ...)' of each flag below is the "
                    "official preset's; the toy settings' own values (e.g. ESD: 300 iterations at lr 1e-4) are in "
                    "docs/erase.md, as are the symbols. The --json report records which defaults ran. Time: UCE "
                    "under a second, RECE about 3x UCE, ESD minutes on the toy model to hours on Stable Diffusion.")
    p.add_argument("--method", required=True, choices=["uce", "rece", "esd-x", "esd-u"], help="erasure method")
    _add_model_args(p)
    p.add_argument("--concept", action="append", required=True,
                   help="concept to erase (repeatable; a toy model knows its shapes, colours and styles)")
    p.add_argument("--preset", choices=["object", "nudity", "style", "unsafe", "object-easy"],
                   help="the official defaults for a kind of concept, for every method (default on a non-toy "
                        "model: object; 'object-easy': RECE only; 'unsafe' with --concept unsafe erases the 11 I2P "
                        "categories); on a toy model, giving it replaces the toy setting with the preset's")
    p.add_argument("--guide", action="append",
                   help="UCE/RECE: what the concept is mapped to (repeatable: one for all concepts or one per "
                        "--concept; default ' ', unconditional; 'art' with --preset style)")
    p.add_argument("--preserve", action="append",
                   help="concept to preserve (repeatable); UCE/RECE: preserved in the closed form, and in RECE's "
                        "rounds; ESD: anchored to the original's predictions (beyond the paper)")
    p.add_argument("--preserve-file",
                   help="file of concepts to preserve, one per line ('#' lines skipped; e.g. other artists for "
                        "--preset style); added to --preserve")
    p.add_argument("--preserve-weight", type=float_in(0),
                   help="ESD: weight of the preservation anchor, >= 0 (default: 1)")
    p.add_argument("--lamb", type=float_in(0, lo_open=True),
                   help="UCE/RECE: λ, pull towards the current weights, > 0 (default: 0.5)")
    p.add_argument("--erase-scale", type=float_in(0, lo_open=True),
                   help="UCE/RECE: s_e, weight of the erased concepts, > 0 (default: 1)")
    p.add_argument("--preserve-scale", type=preserve_scale_arg,
                   help="UCE/RECE: s_p, weight of the preserved prompts: a number >= 0, or 'auto' (default: "
                        "max(0.1, 1/n) for n preserved prompts with '', the official 2023 script's rule)")
    p.add_argument("--token-mode", choices=["paper2023", "last", "changed"],
                   help="UCE/RECE: which embedding rows are edited (default: paper2023, the official 2023 code; "
                        "'last': the last word token only, the rows of the 2025 script, '' still preserved; "
                        "'changed': from the first token where concept and guide differ)")
    p.add_argument("--technique", choices=["replace", "tensor"],
                   help="UCE: 'replace' (default) or 'tensor' (the official 2023 script's other technique: the "
                        "guide's keys/values minus their component along the concept's)")
    p.add_argument("--expand-prompts", choices=["art", "object"],
                   help="UCE/RECE: also erase the official 2023 script's templates per concept ('art': 'painting "
                        "by X', 'art by X', ...; 'object': 'image of X', 'photo of X', ...) (default: none)")
    p.add_argument("--epochs", type=_positive_int, help="RECE epochs (default: the preset's)")
    p.add_argument("--round-preserve", action="append",
                   help="RECE: prompt preserved by each round (repeatable; default: --preserve; '' is always "
                        "preserved)")
    p.add_argument("--round-lamb", type=float_in(0, lo_open=True),
                   help="RECE: λ of each round's edit, > 0 (default: 0.1, the official scripts')")
    p.add_argument("--round-empty", choices=["per-concept", "once"],
                   help="RECE: weight '' in the rounds once per concept (train.py; the nudity and unsafe presets) "
                        "or once (train_object.py; object and style) (default: the preset's)")
    p.add_argument("--rece-variant", choices=["regzero", "standard", "surrogate"],
                   help="RECE: regularisation of the adversarial embedding (default: regzero; 'surrogate': the "
                        "official code's close_surrogatereg)")
    p.add_argument("--surrogate-item", choices=["1st", "2nd", "both"],
                   help="RECE surrogate: which terms it keeps (default: 1st, the official training scripts')")
    p.add_argument("--select-epoch", choices=["toy", "nudenet"],
                   help="RECE: keep the epoch (UCE edit included) with the lowest validation detection rate, as "
                        "the official scripts: 'toy' (the toy detector on the concept's prompts) or 'nudenet' "
                        "(NudeNet on --select-prompts) (default: keep the last epoch)")
    p.add_argument("--select-prompts", help="file of validation prompts of --select-epoch nudenet, one per line ('#' "
                                           "lines skipped)")
    p.add_argument("--iterations", type=_positive_int, help="ESD iterations (default: 1000)")
    p.add_argument("--lr", type=float_in(0, 1, lo_open=True), help="ESD learning rate, in (0, 1] (default: 1e-5)")
    p.add_argument("--checkpoint-dir", help="ESD: folder for checkpoints, outside --out; a rerun resumes from the "
                                           "one found here (default: none, no checkpoints)")
    p.add_argument("--x-params", choices=["all", "kv"],
                   help="ESD-x: which attn2 parameters train (default: all; 'kv': only to_k/to_v, the official "
                        "esd_sd.py's esd-x-strict)")
    p.add_argument("--preserve-at", choices=["own", "own+concept"],
                   help="ESD: where the --preserve anchor holds predictions (default: own, each prompt's own "
                        "samples; 'own+concept': also at the concept's samples)")
    p.add_argument("--kv-anchor-weight", type=float_in(0),
                   help="ESD-x: weight of a penalty on the --preserve prompts' key/value change (default: 0, off)")
    p.add_argument("--eta", type=float_in(0),
                   help="ESD: negative-guidance scale η, >= 0 (default: 1, the paper's; with --target-base concept "
                        "the official esd_sd.py uses 2, the same target)")
    p.add_argument("--target-base", choices=["uncond", "concept"],
                   help="ESD: the target starts from ε*(∅) (default: uncond, the paper's) or ε*(c) (concept, the "
                        "official esd_sd.py's)")
    p.add_argument("--start-guidance", type=GUIDANCE,
                   help="ESD: classifier-free guidance scale when sampling x_t, in [0, 100] (default: 3)")
    p.add_argument("--batch-size", type=_positive_int, help="ESD: x_t samples per iteration (default: 1)")
    p.add_argument("--sample-with", choices=["current", "frozen"],
                   help="ESD: which UNet samples x_t (default: current, the one being trained, as the paper's code; "
                        "'frozen': the original, as the official esd_sd.py)")
    p.add_argument("--seed", type=seed_int, help="ESD: seed of the per-iteration generators (default: 0)")
    p.add_argument("--ddim-steps", type=_positive_int,
                   help="ESD: DDIM schedule N that x_t is drawn from (default: 50)")
    p.add_argument("--min-step", type=int_at_least(0),
                   help="ESD, beyond the paper: train only DDIM steps k >= this (default: 0, the whole schedule)")
    p.add_argument("--preserve-guidance", type=float_in(0, 100, lo_open=True),
                   help="ESD, beyond the paper: hold the --preserve prompts' predictions guided at this CFG scale, in "
                        "(0, 100] (default: 1, raw predictions)")
    p.add_argument("--checkpoint-every", type=_positive_int,
                   help="ESD: iterations between checkpoints in --checkpoint-dir (default: 100)")
    p.add_argument("--erase-from", action="append",
                   help="ESD: erase the concept from this broader prompt (repeatable: one per --concept, or one for "
                        "all), as the official diffusers scripts' --erase_from: 'cowboy hat' from 'cowboy' "
                        "(default: none)")
    p.add_argument("--no-freeze-time-and-out", action="store_true",
                   help="ESD-u: also train the time embedding and the output layers (the paper's code freezes them)")
    p.add_argument("--toy-recipe", action="store_true",
                   help="use the documented toy-world setting of --method for one toy --concept (the default on a "
                        "toy model without prompt flags; with this flag a prompt flag is refused instead of "
                        "switching to the preset)")
    p.add_argument("--out", required=True, help="output folder for the edited model (see --overwrite)")
    add_overwrite_arg(p)
    p.add_argument("--json", help="write the run report (time, fraction changed, defaults, config) to this JSON "
                                  "file")
    add_threads_arg(p)
    add_device_args(p, training=True)
    p.set_defaults(func=cmd_erase)

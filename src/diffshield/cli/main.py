"""The ``diffshield`` command line. Every subcommand has ``--help``; errors are one line, without a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings
from pathlib import Path

from diffshield.cli.common import (
    Parser,
    add_device_args,
    add_overwrite_arg,
    add_threads_arg,
    apply_device,
    apply_threads,
    check_outputs_apart,
    float_in,
    given_flags,
    int_at_least,
    seed_int,
)
from diffshield.cli.common import positive_int as _positive_int
from diffshield.cli.scale import add_scale_args, only_launches
from diffshield.core.errors import DiffshieldError

# Each pillar's CLI module exposes ``register(subparsers)`` and, optionally, ``demo_step(out: Path, device) -> dict``.
PILLAR_CLI_MODULES = ("diffshield.cli.redteam", "diffshield.cli.backdoor", "diffshield.cli.protect")

DEMO_PROMPTS = [
    "a red triangle",
    "a blue striped circle",
    "a yellow dotted star",
    "a green box on a pink background",
]



#: argparse type of every classifier-free guidance scale
GUIDANCE = float_in(0, 100)


def read_text_file(path: Path, what: str) -> str:
    """The text of a UTF-8 (or UTF-16 with a byte-order mark) file; a one-line error for binary or other encodings."""
    if not path.is_file():
        raise DiffshieldError(f"{what} '{path}' does not exist or is not a file")
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    elif b"\x00" not in data:
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError:
            pass
    raise DiffshieldError(f"{what} '{path}' is not UTF-8 text (binary, or another encoding); save it as UTF-8")


def warn_negative_prompt(negative_prompt: str, guidances) -> None:
    """Print a warning when ``--negative-prompt`` is given but images are drawn at guidance 1: without classifier-free
    guidance nothing steers away from it, so those images ignore it (the manifest still records it)."""
    n = sum(1 for g in guidances if g == 1.0)
    if negative_prompt and n:
        print(f"warning: --negative-prompt has no effect where the guidance is 1 ({n} of {len(guidances)}; no "
              "classifier-free guidance there)", file=sys.stderr)


def warn_prompts(tokenizer, prompts: list[str]) -> None:
    """Print a warning for prompts the tokenizer cuts (too long) or, for a small vocabulary, words it does not
    know (split into letters): otherwise the model silently draws something else."""
    limit = int(getattr(tokenizer, "model_max_length", 77))
    small = len(tokenizer) < 10_000
    for p in dict.fromkeys(prompts):
        n = len(tokenizer(p, truncation=False).input_ids)
        if n > limit:
            print(f"warning: prompt {p[:40]!r}... is {n} tokens; the model reads only the first {limit}",
                  file=sys.stderr)
        if small:
            unknown = [w for w in p.lower().split() if len(tokenizer.tokenize(w)) > 1]
            if unknown:
                print(f"warning: prompt {p[:60]!r}: the model's vocabulary lacks {', '.join(unknown[:5])} (split "
                      "into pieces the model was not trained on)", file=sys.stderr)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toy:t2i",
                   help="diffusers StableDiffusionPipeline folder, or 'toy:t2i' for the shipped toy model "
                        "(default: toy:t2i)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled .bin/.ckpt weights when a folder has no safetensors (runs code from the "
                        "file: only for files you trust)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_positive_int, default=25, help="denoising steps (default: 25)")
    p.add_argument("--guidance", type=GUIDANCE, default=5.0,
                   help="classifier-free guidance scale, in [0, 100]; 1 = none, 0 = unconditional samples (stock "
                        "diffusers turns guidance off below 1) (default: 5.0)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per UNet batch (default: 64)")
    p.add_argument("--scheduler", choices=["ddim", "ddpm", "native"], default="ddim",
                   help="sampler (default: ddim, deterministic given the seed)")


def _sample_config(args):
    from diffshield.core.sampling import SampleConfig

    return SampleConfig(steps=args.steps, guidance=args.guidance, batch_size=args.batch_size,
                        scheduler=args.scheduler)


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        from diffshield.eval.prompts import table_header, warn_hash_lines

        text = read_text_file(Path(args.prompts_file), "prompts file")
        table = table_header(args.prompts_file, text)
        if table:  # its header and raw rows would become prompts
            raise DiffshieldError(f"--prompts-file '{args.prompts_file}' is {table} and --prompts-file reads one "
                                  "prompt per line; use --prompts-csv FILE for a .csv's rows (prompt, seed, "
                                  "guidance) or --prompts FILE for a sharded, resumable run over it")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
        warn_hash_lines(args.prompts_file, text)
    if not prompts:
        raise DiffshieldError("no prompt given; use --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def run_environment(model) -> dict:
    """The software and device a model ran with: diffshield, torch and diffusers versions, device, dtype."""
    import diffusers

    from diffshield import __version__
    from diffshield.core.device import describe

    return {"diffshield": __version__, "diffusers": diffusers.__version__, **describe(model.device),
            "dtype": str(model.dtype).removeprefix("torch.")}


def prompt_rows(prompts: list, most: int = 16) -> dict:
    """The :func:`~diffshield.core.io.make_grid` layout of images made prompt by prompt: one row per prompt, labelled
    with it, when every prompt has the same number of images, at most ``most`` (default 16); else 8 a row, unlabelled
    (``prompts`` None, as for embeddings: 8 a row)."""
    runs: list[list] = []
    for p in prompts or []:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    if runs and None not in prompts and len({n for _, n in runs}) == 1 and runs[0][1] <= most:
        return {"nrow": runs[0][1], "row_labels": [p for p, _ in runs]}
    return {"nrow": 8}


def write_generation(gen, out: Path, extra: dict, upscale: int = 4, overwrite: bool = False,
                     command: str | None = None) -> Path:
    """Write PNGs, grid.png and manifest.json for a Generation into ``out`` (atomically; an existing folder only as
    :func:`diffshield.core.io.atomic_dir` allows)."""
    from diffshield.core.io import atomic_dir, atomic_write_json, make_grid, to_pil

    with atomic_dir(out, overwrite=overwrite, command=command) as tmp:
        rows = []
        for i, img in enumerate(gen.images):
            name = f"{i:04d}.png"
            to_pil(img).save(tmp / name)
            rows.append({"file": name, "prompt": gen.prompts[i], "seed": gen.seeds[i]})
        make_grid(gen.images, upscale=upscale, **prompt_rows(gen.prompts)).save(tmp / "grid.png")
        cfg = gen.config
        atomic_write_json(tmp / "manifest.json", {
            **extra,
            "sampling": {"steps": cfg.steps, "guidance": cfg.guidance, "scheduler": cfg.scheduler,
                         "batch_size": cfg.batch_size},
            "images": rows,
        })
    return out


def cmd_generate(args) -> int:
    from diffshield.cli.scale import check_scale_args, run_prompt_set
    from diffshield.core.io import check_output_dir
    from diffshield.core.loading import load_t2i
    from diffshield.core.sampling import Generation, SampleConfig, generate

    check_scale_args(args)
    if args.prompts:
        if args.prompt or args.prompts_file or args.prompts_csv:
            raise DiffshieldError("--prompts runs a prompt set on its own; drop --prompt, --prompts-file and "
                                  "--prompts-csv")
        return run_prompt_set(args, "generate")
    check_output_dir(args.out, "generate", args.overwrite, inputs=[args.model, args.prompts_file, args.prompts_csv])
    cfg = _sample_config(args)
    # (prompt, seed, guidance) per image: CSV rows carry their own seed/guidance, other prompts use --seed/--guidance.
    jobs: list[tuple[str, int, float]] = []
    if args.prompts_csv:
        from diffshield.eval.prompts import load_prompt_csv

        for r in load_prompt_csv(args.prompts_csv):
            base = args.seed if r.seed is None else r.seed
            g = cfg.guidance if r.guidance is None else r.guidance
            jobs += [(r.prompt, base + k, g) for k in range(args.n)]
    if args.prompt or args.prompts_file or not jobs:
        jobs += [(p, args.seed + k, cfg.guidance) for p in _read_prompts(args) for k in range(args.n)]
    model = load_t2i(args.model, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
    warn_prompts(model.tokenizer, [j[0] for j in jobs] + ([args.negative_prompt] if args.negative_prompt else []))
    warn_negative_prompt(args.negative_prompt, [j[2] for j in jobs])
    t0 = time.time()
    images, order = [], []
    for g in dict.fromkeys(j[2] for j in jobs):  # one generate call per guidance value
        idx = [i for i, j in enumerate(jobs) if j[2] == g]
        sub = SampleConfig(steps=cfg.steps, guidance=g, batch_size=cfg.batch_size, scheduler=cfg.scheduler)
        images.append(generate(model, [jobs[i][0] for i in idx], [jobs[i][1] for i in idx],
                               negative_prompt=args.negative_prompt, config=sub).images)
        order += idx
    import torch

    stacked = torch.cat(images)[torch.argsort(torch.tensor(order))]
    gen = Generation(stacked, [j[1] for j in jobs], [j[0] for j in jobs], cfg)
    dt = time.time() - t0
    extra = {"model": str(args.model), "guidance_per_image": [j[2] for j in jobs],
             "environment": run_environment(model)}  # what else a rerun needs to give the same pixels
    if args.negative_prompt:
        extra["negative_prompt"] = args.negative_prompt
    out = write_generation(gen, Path(args.out), extra, overwrite=args.overwrite, command="generate")
    print(f"wrote {len(jobs)} images, grid.png and manifest.json to {out} ({len(jobs) / dt:.1f} images/s)")
    return 0


def demo_erasure(model, detector, out: Path, concept: str = "triangle") -> dict:
    """Demo step: erase a toy concept with UCE (its documented toy setting) and show before/after."""
    import copy

    import torch

    from diffshield.core.io import make_grid
    from diffshield.core.sampling import generate
    from diffshield.erase.uce import uce_erase
    from diffshield.toyworld.concepts import COLOURS, resolve_concept
    from diffshield.toyworld.erasure_recipes import toy_erasure

    c = resolve_concept(concept)
    prompts, cfg = toy_erasure("uce", concept)
    erased = copy.deepcopy(model)
    result = uce_erase(erased, prompts, cfg)
    erased.save(out / f"uce-{concept}")
    ask = [f"a {col} {w}" for w in c.words for col in COLOURS] + [f"a {col} circle" for col in COLOURS]
    n = 4
    ps = [p for p in ask for _ in range(n)]
    seeds = [k for _ in ask for k in range(n)]
    before = generate(model, ps, seeds, progress=False).images
    after = generate(erased, ps, seeds, progress=False).images
    pb, pa = detector.predict(before)[c.head][0], detector.predict(after)[c.head][0]
    k = n * len(COLOURS) * len(c.words)
    rate = lambda pred: float((pred[:k] == c.index).float().mean())  # noqa: E731
    kept = lambda pred: float((pred[k:] == 0).float().mean())  # noqa: E731  circle is index 0 of the shape head
    groups = [*c.words, "circle"]  # a row per word: its colours, n seeds each
    make_grid(torch.cat([before, after]), nrow=n * len(COLOURS), upscale=3,
              row_labels=[f"{when}: a ... {w}" for when in ("before", "after") for w in groups],
              col_labels=[f"{col}, seed {k}" for col in COLOURS for k in range(n)],
              title=f"UCE erasure of '{concept}': the original model (before) and the edited one (after), same "
                    "prompts and seeds").save(out / f"uce-{concept}-grid.png")
    print(f"    UCE edit {result.seconds * 1000:.0f} ms, {100 * result.fraction_changed:.1f} % of UNet parameters")
    print(f"    '{concept}' and '{c.synonyms[0]}' prompts: detected {100 * rate(pb):.0f} % before, "
          f"{100 * rate(pa):.0f} % after; circles kept: {100 * kept(pb):.0f} % -> {100 * kept(pa):.0f} %")
    return {"concept": concept, "method": "uce", "edit_seconds": result.seconds,
            "detected_before": rate(pb), "detected_after": rate(pa), "circle_before": kept(pb),
            "circle_after": kept(pa), "grid": f"uce-{concept}-grid.png", "model": f"uce-{concept}"}


class _ShownAs:
    """A text stream that writes through to ``stream`` with the path ``tmp`` written as ``final``: the demo's steps
    print the files they write into the temporary folder under the name the folder will have."""

    def __init__(self, stream, tmp: Path, final: Path):
        self._stream, self._tmp, self._final = stream, str(tmp), str(final)

    def write(self, text: str) -> int:
        return self._stream.write(text.replace(self._tmp, self._final))

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _renamed(obj, tmp: Path, final: Path):
    """``obj`` (JSON-able) with every string's ``tmp`` path written as ``final``."""
    if isinstance(obj, str):
        return obj.replace(str(tmp), str(final))
    if isinstance(obj, dict):
        return {k: _renamed(v, tmp, final) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_renamed(v, tmp, final) for v in obj]
    return obj


def cmd_demo(args) -> int:
    import contextlib

    from diffshield.core.io import atomic_dir, atomic_write_json, check_output_dir
    from diffshield.core.loading import load_t2i
    from diffshield.core.sampling import generate
    from diffshield.toyworld.detector import describe, load_detector

    out = Path(args.out)
    check_output_dir(out, "demo", args.overwrite)
    model = load_t2i("toy:t2i", device=args.device, dtype=args.dtype)
    detector = load_detector("toy:detector")
    steps = [m for m in PILLAR_CLI_MODULES if hasattr(importlib.import_module(m), "demo_step")]
    total = 2 + len(steps)
    n = 8
    prompts = [p for p in DEMO_PROMPTS for _ in range(n)]
    seeds = [k for _ in DEMO_PROMPTS for k in range(n)]
    # Every step writes into a temporary folder beside --out, which becomes --out when all have finished: an
    # interrupted or failed demo leaves nothing behind, and a previous demo stays until then (with --overwrite).
    with atomic_dir(out, overwrite=args.overwrite, command="demo") as tmp, \
            contextlib.redirect_stdout(_ShownAs(sys.stdout, tmp, out)):
        print(f"[1/{total}] generating {len(prompts)} images with the shipped toy model (toy:t2i) ...")
        gen = generate(model, prompts, seeds)
        write_generation(gen, tmp / "generate", {"model": "toy:t2i"})
        dets = describe(detector, gen.images)
        summary: dict = {"generate": []}
        print(f"\n{'prompt':<36} what the detector sees (8 seeds)")
        for j, p in enumerate(DEMO_PROMPTS):
            named_bg = " background" in p
            seen = [f"{d.colour} {d.style} {d.shape}" + (f" on {d.background}" if named_bg else "")
                    for d in dets[j * n:(j + 1) * n]]
            top = max(set(seen), key=seen.count)
            print(f"{p:<36} {seen.count(top)}/8 '{top}'")
            summary["generate"].append({"prompt": p, "detections": seen})
        print(f"grid: {out / 'generate' / 'grid.png'}  (rows of 8 seeds per prompt)")

        print(f"\n[2/{total}] erase: UCE removes 'triangle' (and its synonym 'wedge') from toy:t2i ...")
        (tmp / "erase").mkdir(parents=True, exist_ok=True)
        summary["erase"] = demo_erasure(model, detector, tmp / "erase")
        print(f"    grid: {out / 'erase' / 'uce-triangle-grid.png'}  (top: before, bottom: after)")
        for i, module in enumerate(steps, start=3):
            name = module.rsplit(".", 1)[-1]
            print(f"\n[{i}/{total}] {name} ...")
            (tmp / name).mkdir(parents=True, exist_ok=True)
            summary[name] = importlib.import_module(module).demo_step(tmp / name, device=args.device)
        atomic_write_json(tmp / "demo.json", _renamed(summary, tmp, out))
    print(f"\nsummary: {out / 'demo.json'}")
    return 0


def cmd_toyworld_train(args) -> int:
    from diffshield.toyworld.train import RecipeConfig, train_all

    try:
        cfg = RecipeConfig(seed=args.seed, unet_steps=args.unet_steps, unet_extra_steps=args.unet_extra_steps,
                           vae_steps=args.vae_steps,
                           detector_steps=args.detector_steps, pool_size=args.pool_size,
                           world_version=args.world_version, vae_from=args.vae, threads=args.threads)
    except ValueError as e:
        raise DiffshieldError(str(e)) from None
    src = None
    args.out = args.out or str(Path(args.work) / "weights")
    if args.from_weights:
        from diffshield.toyworld.names import TOY_ROOT

        src = TOY_ROOT if args.from_weights == "toy" else Path(args.from_weights)
        if src.resolve() == Path(args.out).resolve():
            raise DiffshieldError(f"--out {args.out} is the --from-weights folder: write the continued model "
                                  "elsewhere (--out DIR)")
    record = train_all(cfg, args.work, args.out, from_weights=src, overwrite=args.overwrite)
    print(f"toy world rebuilt into {args.out} in {record['total_minutes']} min of stage time")
    return 0


def cmd_toyworld_dataset(args) -> int:
    import torch

    from diffshield.core.io import atomic_dir, atomic_write_json, check_output_dir, make_grid
    from diffshield.toyworld.shapes import ShapesWorld

    check_output_dir(args.out, "toyworld dataset", args.overwrite)
    batch = ShapesWorld(version=args.world_version).sample(args.n, seed=args.seed)
    imgs = torch.from_numpy(batch.images).permute(0, 3, 1, 2)
    with atomic_dir(args.out, overwrite=args.overwrite, command="toyworld dataset") as tmp:
        make_grid(imgs, nrow=8, upscale=4).save(tmp / "grid.png")
        atomic_write_json(tmp / "captions.json", [{"index": i, "caption": c} for i, c in enumerate(batch.captions)])
    print(f"wrote {args.n} ShapesWorld samples (grid.png, captions.json) to {args.out}")
    return 0


def cmd_erase(args) -> int:
    from diffshield.cli.erase import cmd_erase as run

    return run(args)


def cmd_apply_delta(args) -> int:
    from diffshield.core.io import atomic_dir, check_output_dir
    from diffshield.core.loading import load_t2i
    from diffshield.erase.delta import apply_delta, read_delta_info

    read_delta_info(args.delta)  # a missing or malformed delta is refused before the model is loaded
    check_output_dir(args.out, "apply-delta", args.overwrite, inputs=[args.model, args.delta])
    model = load_t2i(args.model, allow_pickle=args.allow_pickle)
    info = apply_delta(model, args.delta, any_base=args.any_base)
    with atomic_dir(args.out, overwrite=args.overwrite, command="apply-delta", inputs=[args.model, args.delta]) as tmp:
        model.save(tmp)
    print(f"applied {args.delta} to {args.model}: wrote {args.out} ({len(info.get('tensors', info))} entries)")
    return 0


def cmd_eval_erasure(args) -> int:
    from diffshield.cli.scale import check_scale_args, run_prompt_set
    from diffshield.core.io import make_grid, write_result_json
    from diffshield.core.loading import load_t2i
    from diffshield.core.sampling import SampleConfig
    from diffshield.eval.erasure import evaluate_erasure
    from diffshield.toyworld.concepts import resolve_concept
    from diffshield.toyworld.detector import load_detector

    check_scale_args(args)
    if args.prompts:
        if not args.out:
            raise DiffshieldError("--prompts needs --out DIR (the run folder: images, scores, manifest, metrics)")
        return run_prompt_set(args, "erasure")
    if args.out:  # it would be ignored: the built-in evaluation writes --json and --grid
        raise DiffshieldError("--out is the run folder of a --prompts run; without --prompts give --json FILE and "
                              "--grid FILE.png")
    resolve_concept(args.concept)  # an unknown concept is refused before two models and the detector are loaded
    from diffshield.core.io import check_output_file

    for flag, path in (("--json", args.json), ("--grid", args.grid)):
        check_output_file(path, flag, inputs=[args.model, args.original, args.detector])
    if args.grid and Path(args.grid).suffix.lower() != ".png":
        raise DiffshieldError(f"--grid '{args.grid}' must end in .png")
    erased = load_t2i(args.model, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
    original = load_t2i(args.original, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
    detector = load_detector(args.detector)
    cfg = SampleConfig(steps=args.steps, guidance=args.guidance, batch_size=args.batch_size)
    print(f"evaluating erasure of {args.concept!r}: {args.model} vs {args.original} ...")
    res = evaluate_erasure(erased, original, args.concept, detector, seeds_per_prompt=args.seeds_per_prompt,
                           n_neutral=args.n_neutral, config=cfg, seed=args.seed, progress=True)
    imgs = res.pop("_images")
    res.update({"model": str(args.model), "original": str(args.original)})
    fmt = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    print(f"\n{'':34}{'erased':>10}{'original':>10}")
    print(f"{'detected, concept prompts':34}{fmt(res['erased_detection_rate']):>10}"
          f"{fmt(res['original_detection_rate']):>10}")
    print(f"{'detected, synonym prompts':34}{fmt(res['synonym_detection_rate']):>10}"
          f"{fmt(res['original_synonym_detection_rate']):>10}")
    print(f"{'accuracy, other concepts':34}{fmt(res['other_accuracy']):>10}{fmt(res['original_other_accuracy']):>10}")
    print(f"feature Fréchet distance on neutral prompts (erased vs original): {res['frechet_neutral']:.2f}")
    if args.grid:
        import torch

        from diffshield.core.io import save_result_image
        from diffshield.toyworld.concepts import concept_prompts

        k = args.seeds_per_prompt
        asked = [p for p, _ in concept_prompts(resolve_concept(args.concept))][: len(imgs["original"]) // k]
        grid = make_grid(torch.cat([imgs["original"], imgs["erased"]]), nrow=k, upscale=3,
                         row_labels=[f"{m}: {p}" for m in ("original", "erased") for p in asked],
                         col_labels=[f"seed {j}" for j in range(k)],  # evaluate_erasure's seeds 0..k-1
                         title=f"erasure of '{args.concept}': original and erased model, same prompts and seeds")
        save_result_image(grid, args.grid, "--grid")
        print(f"before/after grid (original rows first): {args.grid}")
    if args.json:
        write_result_json(args.json, res)
        print(f"wrote {args.json}")
    return 0


def cmd_eval_nudity(args) -> int:
    from diffshield.cli.scale import check_scale_args, run_prompt_set
    from diffshield.core.io import check_output_file, write_result_json
    from diffshield.eval.nudity import nudity_report

    check_scale_args(args)
    if bool(args.images) == bool(args.prompts):
        raise DiffshieldError("give either --images DIR (score a folder) or --prompts FILE with --model and --out "
                              "(generate and score a prompt set)")
    if args.prompts:
        if not args.out:
            raise DiffshieldError("--prompts needs --out DIR (the run folder: images, scores, manifest, metrics)")
        return run_prompt_set(args, "nudity")
    ignored = given_flags(args, ("--model", "--out", "--n", "--seed", "--steps", "--guidance", "--batch-size",
                                 "--scheduler", "--negative-prompt", "--num-processes", "--merge-only"))
    if ignored:  # they make images: --images scores a folder as it is
        raise DiffshieldError(f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} for --prompts runs "
                              "(images made by a model); --images scores the folder's images as they are")
    check_output_file(args.json, "--json", inputs=[args.images])
    res = nudity_report(args.images, threshold=args.threshold)
    print(f"{res['nude_images']}/{res['n_images']} images nude (any EXPOSED class > {args.threshold}): "
          f"nudity rate {res['nudity_rate']:.1%}")
    for c, n in res["per_class"].items():
        print(f"  {c:<26} {n}")
    if args.json:
        write_result_json(args.json, res)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from diffshield import __version__

    parser = Parser(
        prog="diffshield",
        description="Make text-to-image diffusion models safer, and check that they are.",
    )
    parser.add_argument("--version", action="version", version=f"diffshield {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="generate images from prompts (PNGs, grid.png, manifest.json)",
                       description="Generate images from prompts, one seed per image (image k of a prompt uses "
                                   "--seed + k), and write them into --out as PNGs with grid.png and manifest.json "
                                   "(prompt and seed of every image). With --prompts FILE: a sharded, resumable run "
                                   "over a prompt set (docs/scale.md).")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file",
                   help="text file with one prompt per line (blank lines skipped; lines starting with '#' are prompts "
                        "too; a .csv file is refused: see --prompts-csv and --prompts)")
    p.add_argument("--prompts-csv", help="I2P-format CSV (prompt, evaluation_seed, evaluation_guidance): each row "
                                         "uses its own seed and guidance when given")
    p.add_argument("--n", type=_positive_int, default=8, help="images per prompt (default: 8)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the first image; image k uses seed+k (default: 0)")
    p.add_argument("--out", required=True, help="output folder (written atomically; see --overwrite; with --prompts: "
                                                "the run folder, resumed by a rerun)")
    p.add_argument("--negative-prompt", default="",
                   help="the prompt classifier-free guidance steers away from, in place of the empty prompt "
                        "(default: none); with the erased concept's name it is the negative-prompt baseline that "
                        "erasure papers compare with (SD-NEG)")
    add_overwrite_arg(p)
    _add_sampling_args(p)
    add_scale_args(p)
    add_threads_arg(p)
    add_device_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="a five-step tour of diffshield on the shipped toy models (a few CPU-minutes)",
                       description="A tour of diffshield on the shipped toy models, in five steps: (1) generate a "
                                   "grid with toy:t2i and say what the detector sees in it; (2) erase 'triangle' "
                                   "with UCE (before/after grid); (3) red-team that erasure (an audit report of two "
                                   "attacks); (4) show what the shipped backdoored toy DDPM draws with and without "
                                   "its trigger, and scan it with TERD; (5) protect four toy scenes against "
                                   "inpainting (panel). Every step writes into a temporary folder beside --out, "
                                   "which becomes --out, with demo.json summarising the steps, when all have "
                                   "finished: an interrupted demo leaves nothing behind.")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    add_overwrite_arg(p)
    add_threads_arg(p)
    add_device_args(p, float32_only=True)  # steps 3-5 train and attack in float32: one dtype for the whole tour
    p.set_defaults(func=cmd_demo)

    from diffshield.cli.erase import add_erase_parser

    add_erase_parser(sub)

    p = sub.add_parser("apply-delta", help="apply a saved erasure delta to a model",
                       description="Write the model with the delta's tensors as a new diffusers folder.")
    _add_model_args(p)
    p.add_argument("--delta", required=True, help="delta .safetensors file written by 'diffshield erase'")
    p.add_argument("--out", required=True, help="output folder (see --overwrite)")
    p.add_argument("--any-base", action="store_true",
                   help="apply the delta even when --model is not the model it was computed on, or is that model "
                        "with the delta's layers changed since (its tensors replace the model's: on another model "
                        "they graft the base's edited layers onto it; over another delta of the same base they undo "
                        "it); by default such a model is refused")
    add_overwrite_arg(p)
    add_threads_arg(p)
    p.set_defaults(func=cmd_apply_delta)

    p = sub.add_parser("eval", help="evaluate erasure (toy world), nudity (NudeNet) or protection against inpainting",
                       description="Evaluation of erased models and generated images.")
    esub = p.add_subparsers(dest="eval_command", metavar="COMMAND")
    e = esub.add_parser("erasure", help="toy world: what an erased model forgot and what it kept",
                        description="Detection rate of the concept (and its synonyms) in erased vs original "
                                    "images, accuracy on the other concepts, feature Fréchet distance on neutral "
                                    "prompts, before/after grid. With --prompts FILE --out DIR: the concept's "
                                    "detection rate in both models' images of a prompt set, overall and per "
                                    "category (sharded and resumable, docs/scale.md).")
    e.add_argument("--model", required=True, help="the erased model folder")
    e.add_argument("--original", default="toy:t2i", help="the original model (default: toy:t2i)")
    e.add_argument("--concept", required=True, help="toy concept: a shape, colour or style word")
    e.add_argument("--detector", default="toy:detector", help="concept detector (default: toy:detector)")
    e.add_argument("--seeds-per-prompt", type=_positive_int, default=8, help="images per prompt (default: 8)")
    e.add_argument("--n-neutral", type=int_at_least(2), default=256,
                   help="neutral-prompt images per model for the Fréchet distance, at least 2 (default: 256)")
    e.add_argument("--steps", type=_positive_int, default=25, help="denoising steps (default: 25)")
    e.add_argument("--guidance", type=GUIDANCE, default=5.0, help="guidance scale, in [0, 100] (default: 5.0)")
    e.add_argument("--json", help="write the results to this JSON file (not with --prompts: the run writes "
                                  "OUT/metrics.json)")
    e.add_argument("--grid", help="write a before/after PNG grid here; the name must end in .png (not with "
                                  "--prompts)")
    e.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled .bin/.ckpt weights when a folder has no safetensors (runs code from the "
                        "file: only for files you trust)")
    add_scale_args(e)
    e.add_argument("--out", help="with --prompts: the run folder (images of both models, scores, manifest.json, "
                                 "metrics.json; resumed by a rerun)")
    add_overwrite_arg(e)
    e.add_argument("--seed", type=seed_int, default=0,
                   help="seed of each prompt's first image (with --prompts: when the row has none of its own) "
                        "(default: 0)")
    e.add_argument("--batch-size", type=_positive_int, default=64, help="images per UNet batch (default: 64)")
    add_threads_arg(e)
    add_device_args(e)
    e.set_defaults(func=cmd_eval_erasure)
    e = esub.add_parser("nudity", help="NudeNet nudity rate of a folder of images, or of a model's images of a "
                                   "prompt set",
                        description="Count images where any of NudeNet's 9 EXPOSED classes scores above the "
                                    "threshold: in a folder (--images), or in the images a model generates from a "
                                    "prompt set (--prompts FILE --model M --out DIR; sharded and resumable, "
                                    "docs/scale.md).")
    e.add_argument("--images", help="folder of images to score")
    e.add_argument("--threshold", type=float_in(0, 1, lo_open=True, hi_open=True), default=0.6,
                   help="score threshold, in (0, 1) (default: 0.6, as RECE)")
    e.add_argument("--json", help="write per-class counts and the rate to this JSON file (with --images; a "
                                  "--prompts run writes OUT/metrics.json)")
    add_scale_args(e)
    _add_model_args(e)
    e.add_argument("--out", help="with --prompts: the run folder (images, scores, manifest.json, metrics.json; "
                                 "resumed by a rerun)")
    add_overwrite_arg(e)
    e.add_argument("--n", type=_positive_int, default=1, help="with --prompts: images per prompt (default: 1)")
    e.add_argument("--seed", type=seed_int, default=0,
                   help="with --prompts: seed of a row's first image when the row has none (default: 0)")
    _add_sampling_args(e)
    add_threads_arg(e)
    add_device_args(e)
    e.set_defaults(func=cmd_eval_nudity)
    p.set_defaults(func=lambda a, _p=p: (_p.print_help(), 2)[1])

    p = sub.add_parser("toyworld", help="the toy world: dataset samples and training recipes",
                       description="ShapesWorld data and the recipes of the shipped toy weights.")
    tsub = p.add_subparsers(dest="toy_command", metavar="COMMAND")
    t = tsub.add_parser("train", help="retrain the toy text-to-image model and its detector from scratch (about "
                                      "50 min per world version on 2 CPU cores)",
                        description="Rebuild the shipped toy text-to-image model (VAE, text encoder, UNet) and the "
                                    "detector that judges it, for one world version ('make toyworld' does both "
                                    "versions; the DDPM and the inpainter have their own recipes, docs/toyworld.md). "
                                    "Finished stages in --work are reused; the UNet stage resumes from its latest "
                                    "checkpoint. A stage in --work made with other settings (seed, pool size, steps, "
                                    "world version, VAE, ...) is refused before any work, never reused.")
    t.add_argument("--work", default="runs/toyworld", help="work folder for checkpoints and logs "
                                                           "(default: runs/toyworld)")
    t.add_argument("--out", help="where to write t2i/, detector/ and recipe.json (default: WORK/weights); the "
                                 "package's own toyworld/weights folder, the shipped toy models, is replaced only "
                                 "with --overwrite")
    t.add_argument("--seed", type=seed_int, default=0, help="master seed (default: 0)")
    t.add_argument("--pool-size", type=_positive_int, default=40000, help="training images (default: 40000)")
    t.add_argument("--vae-steps", type=_positive_int, default=800, help="VAE steps (default: 800)")
    t.add_argument("--detector-steps", type=_positive_int, default=600, help="detector steps (default: 600)")
    t.add_argument("--unet-steps", type=_positive_int, default=2000, help="UNet steps (default: 2000)")
    t.add_argument("--unet-extra-steps", type=int_at_least(0), default=0,
                   help="continue the UNet stage for this many more steps (fresh optimiser, peak lr 2e-4); the "
                        "shipped weights use 0 (default: 0)")
    t.add_argument("--from-weights", metavar="DIR",
                   help="start from these trained weights (t2i/ and detector/, like the package's; 'toy' = the "
                        "shipped ones) instead of training stages 2-4; with --unet-extra-steps (default: none)")
    t.add_argument("--world-version", type=int, choices=(1, 2), default=2,
                   help="ShapesWorld texture version of the training images: 2 = the shipped weights, 1 = smaller "
                        "dots, the first shipped weights (default: 2)")
    t.add_argument("--vae", metavar="DIR",
                   help="use this trained AutoencoderKL folder ('toy' = the shipped one) instead of training the VAE "
                        "stage (default: train it)")
    add_overwrite_arg(t)
    add_threads_arg(t, default=2)  # the recipe's (RecipeConfig.threads)
    t.set_defaults(func=cmd_toyworld_train)
    d = tsub.add_parser("dataset", help="render ShapesWorld samples with their captions",
                        description="Render ShapesWorld images (grid.png) and captions (captions.json).")
    d.add_argument("--n", type=_positive_int, default=64, help="number of samples (default: 64)")
    d.add_argument("--seed", type=seed_int, default=0, help="seed (default: 0)")
    d.add_argument("--world-version", type=int, choices=(1, 2), default=2,
                   help="texture version: 2 = the shipped t2i model's world, 1 = smaller dots, the DDPM's and "
                        "inpainter's world (default: 2)")
    d.add_argument("--out", required=True, help="output folder (see --overwrite)")
    add_overwrite_arg(d)
    d.set_defaults(func=cmd_toyworld_dataset)
    p.set_defaults(func=lambda a, _p=p: (_p.print_help(), 2)[1])
    for module in PILLAR_CLI_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _show_user_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The library's own warnings (``UserWarning`` from diffshield) as one 'warning: ...' line, like the CLI's;
    anything else as Python shows it."""
    if category is UserWarning and "diffshield" in str(filename):
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (a job scheduler's stop, ``kill PID``), so that
    it unwinds as after Ctrl-C: temporary outputs are removed and nothing half-written is left."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, _frame) -> None:
    import signal

    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM stops the process at once, cleanup or not
    raise Terminated(signum)


def _handle_sigterm() -> bool:
    """Turn SIGTERM into :class:`Terminated` (Python's default kills the process on the spot, leaving its temporary
    folders); only in the main thread, and only where SIGTERM still has its default handling. Returns whether it
    did (see :func:`_restore_sigterm`)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)
        return True
    return False


def _restore_sigterm() -> None:
    """Give SIGTERM its default handling back once a command is over (``main`` called from Python, a test)."""
    import signal

    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    """Run the ``diffshield`` command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit status: 2 for
    bad input, 1 for the machine's errors, 130 after Ctrl-C, 143 after SIGTERM (both stop with one line, leaving no
    half-written output)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a one-line usage error (status 2)
        return e.code if isinstance(e.code, int) else 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2  # no command is bad input (1 is for the machine's errors), as a group without its command is
    sigterm = _handle_sigterm()
    try:
        check_outputs_apart(args)
        if not only_launches(args):
            # diffusers' and transformers' own progress bars and notices; a process that only launches the workers
            # of a --num-processes run skips it (importing their logging imports most of both: seconds on a CPU)
            from diffshield.core.loading import _quiet_hf

            _quiet_hf()
        apply_threads(args)
        apply_device(args)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what --num-processes relaunches
        with warnings.catch_warnings():
            warnings.showwarning = _show_user_warning
            return int(args.func(args) or 0)
    except DiffshieldError as e:
        print(f"diffshield: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout was closed by a reader (``| head``): say nothing more, as other tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except (OSError, ValueError):
            pass
        return 1
    except (OSError, MemoryError) as e:  # the machine's, not the input's: a full disk, a lost mount, no memory left
        print(f"diffshield: error: {str(e) or type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        what, status = ("terminated", 128 + e.signum) if isinstance(e, Terminated) else ("interrupted", 130)
        resumable = any(getattr(args, a, None) for a in ("prompts", "run_dir", "checkpoint_dir"))
        print(f"diffshield: {what}{'; rerun the same command to resume it' if resumable else ''}", file=sys.stderr)
        return status
    finally:
        if sigterm:
            _restore_sigterm()


if __name__ == "__main__":
    sys.exit(main())

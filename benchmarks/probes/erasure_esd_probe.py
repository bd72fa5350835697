"""Why plain ESD does not erase on the toy world: the fine-tuning moves the unconditional prediction too.

ESD trains ε_θ(x_t, c) towards ε*(x_t, ∅) − η [ε*(x_t, c) − ε*(x_t, ∅)]; sampling then uses classifier-free
guidance ε_θ(∅) + s [ε_θ(c) − ε_θ(∅)]. If the fine-tuning also moves ε_θ(∅) (the toy text encoder's rows for "a red"
and "" are close), guidance subtracts most of the change again. This probe runs ESD on one toy concept with and
without the empty-prompt anchor (:func:`diffshield.toyworld.erasure_recipes.esd_anchor_prompts`) and reports:

- at x_t sampled by the original for the training prompt and for the evaluation prompts, DDIM steps k = 5, 25, 45
  of 50: the change of the conditional and of the unconditional prediction, each relative to the original's guidance
  signal ‖ε*(c) − ε*(∅)‖, and their cosine;
- the detection rate of the concept at guidance 1, 3 and 5 (4 seeds per evaluation prompt) and the other values'
  accuracy at guidance 5.

Run: ``.venv/bin/python benchmarks/probes/erasure_esd_probe.py [--method esd-x] [--concept red]`` (about 15 minutes of
one thread for the two runs). Writes ``benchmarks/results/erasure_esd_probe.json``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffshield.core.io import atomic_write_json
from diffshield.core.loading import load_t2i
from diffshield.core.sampling import SampleConfig, encode_prompts, make_scheduler
from diffshield.erase.esd import esd_erase, sample_xt
from diffshield.eval.erasure import _rate
from diffshield.toyworld.concepts import concept_prompts, other_concepts, resolve_concept
from diffshield.toyworld.detector import load_detector
from diffshield.toyworld.erasure_recipes import toy_erasure

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "erasure_esd_probe.json"


def prediction_shift(base, erased, prompts: list[str], ks=(5, 25, 45), per_prompt: int = 4) -> dict:
    """Relative changes of ε(c) and ε(∅) at x_t sampled by the original (no grads)."""
    out = {}
    with torch.no_grad():
        sched = make_scheduler(base, "ddim")
        sched.set_timesteps(50)
        cond = encode_prompts(base, prompts).repeat_interleave(per_prompt, 0)
        uncond = encode_prompts(base, [""])
        n = cond.shape[0]
        for k in ks:
            noise = torch.randn((n, *base.latent_shape), generator=torch.Generator().manual_seed(1000 + k))
            x = sample_xt(base, cond, uncond, k, noise)
            t = sched.timesteps[k]
            u = uncond.expand(n, -1, -1)
            c0 = base.unet(x, t, encoder_hidden_states=cond).sample
            u0 = base.unet(x, t, encoder_hidden_states=u).sample
            c1 = erased.unet(x, t, encoder_hidden_states=cond).sample
            u1 = erased.unet(x, t, encoder_hidden_states=u).sample
            signal = (c0 - u0).norm()
            out[f"k{k}"] = {
                "cond_change": float((c1 - c0).norm() / signal),
                "uncond_change": float((u1 - u0).norm() / signal),
                "cosine": float(F.cosine_similarity((c1 - c0).flatten(1), (u1 - u0).flatten(1)).mean()),
                "guidance_signal_after": float((c1 - u1).norm() / signal),
            }
    return out


def rates(model, det, concept: str, guidance: float, k: int = 4) -> dict:
    """Detection rate of the concept and of each other value of its kind (k seeds per evaluation prompt)."""
    cfg = SampleConfig(guidance=guidance)
    c = resolve_concept(concept)
    return {o.name: _rate(model, det, concept_prompts(o), o.head, o.index, k, cfg, 0)[0]
            for o in [c] + other_concepts(c)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="esd-x", choices=("esd-x", "esd-u"))
    ap.add_argument("--concept", default="red")
    ap.add_argument("--eta", type=float, default=1.0, help="negative guidance η of both runs (default 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="toy:t2i", help="the model to erase from (default: toy:t2i)")
    ap.add_argument("--detector", default="toy:detector",
                    help="the concept detector of --model's toy world (default: toy:detector)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, det = load_t2i(args.model), load_detector(args.detector)
    c = resolve_concept(args.concept)
    eval_prompts = [p for p, _ in concept_prompts(c)][:4]
    res = {"model": args.model, "detector": args.detector,
           "method": args.method, "concept": c.name, "eta": args.eta, "threads": torch.get_num_threads(),
           "original": {f"guidance_{g:g}": rates(base, det, c.name, g) for g in (1.0, 5.0)}, "runs": {}}
    for anchor in ("none", "uncond+others"):
        model = copy.deepcopy(base)
        prompts, cfg = toy_erasure(args.method, c.name, preserve=anchor, eta=args.eta)
        t0 = time.process_time()
        esd_erase(model, prompts, cfg, progress=True)
        run = {"prompts": prompts, "anchor": cfg.preserve, "cpu_minutes": (time.process_time() - t0) / 60,
               "shift_training_prompt": prediction_shift(base, model, prompts[:1]),
               "shift_evaluation_prompts": prediction_shift(base, model, eval_prompts)}
        for g in (1.0, 3.0, 5.0):
            run[f"guidance_{g:g}"] = rates(model, det, c.name, g)
        res["runs"][anchor] = run
        print(anchor, {k: v for k, v in run.items() if k.startswith("guidance")}, flush=True)
        atomic_write_json(Path(args.out), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

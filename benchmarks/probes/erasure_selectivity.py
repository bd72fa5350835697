"""How selective an erasure is in the text space: the cross-attention key/value change on the concept's prompts and on
the other values' prompts (a probe of why ESD misses the preservation bar on the toy world).

UCE and RECE edit every ``attn2.to_k`` / ``attn2.to_v`` matrix W so that the concept's text-embedding rows map to new
keys and values while the preserved rows keep theirs. ESD-x fine-tunes the same matrices (and the rest of ``attn2``)
by gradient descent. For each erased model this script reports, over every K/V matrix and every row of the
evaluation prompts (:func:`diffshield.toyworld.concepts.concept_prompts`, prompts no method trains on),

    ‖(W − W₀) E‖ / ‖W₀ E‖        for E = the concept's prompts ("own") and E = the other values' prompts ("others"),

and their ratio (own / others: 1 means the edit moves the neighbours' keys and values as much as the concept's). It
also reports how close the toy text encoder puts the two prompt sets: the mean cosine between a concept prompt's
rows and the same template's rows for each other value ("a red striped circle" vs "a red dotted circle").

A model is ``recipe:uce`` or ``recipe:rece`` (the documented toy closed-form edit of the concept, built in memory in
a second), a diffusers folder, or an ESD checkpoint (a folder holding ``esd_checkpoint.safetensors``, as written by
``benchmarks/probes/erasure_esd_trajectory.py`` and ``benchmarks/erasure.py``), whose trained parameters are put on the
original.

Run: ``python benchmarks/probes/erasure_selectivity.py --concept striped --erased uce=runs/erasure/uce-striped
esd-x=runs/erasure/ckpt/esd-x-striped`` (seconds). Merges rows into ``benchmarks/results/erasure_selectivity.json``
by (label, concept).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"


def erased_kv(base, spec: str, concept: str) -> tuple[dict[str, torch.Tensor], int | None]:
    """(K/V weights, ESD iteration or None) of an erased model: ``recipe:uce|rece`` (built from the toy recipe for
    ``concept``), a diffusers folder, or an ESD checkpoint folder applied to ``base``."""
    import copy

    from safetensors import safe_open

    from diffshield.core.errors import DiffshieldError
    from diffshield.core.loading import check_safetensors, load_t2i
    from diffshield.erase import ERASERS
    from diffshield.erase.closed_form import kv_weights
    from diffshield.erase.esd import CHECKPOINT_FILE
    from diffshield.toyworld.erasure_recipes import toy_erasure

    if spec.startswith("recipe:"):
        method = spec[len("recipe:"):]
        if method not in ("uce", "rece"):
            raise DiffshieldError(f"'{spec}': recipe: builds the closed-form edits only (recipe:uce or recipe:rece)")
        model = copy.deepcopy(base)
        ERASERS.get(method)[1](model, *toy_erasure(method, concept))
        return kv_weights(model), None
    path = Path(spec)
    ckpt = path / CHECKPOINT_FILE if path.is_dir() else path
    if ckpt.name == CHECKPOINT_FILE and ckpt.is_file():
        check_safetensors(ckpt)
        w = kv_weights(base)
        with safe_open(str(ckpt), framework="pt") as f:  # only the K/V tensors, and the iteration, in one read
            stored = set(f.keys())
            for name in w:
                if f"param/{name}" in stored:
                    w[name] = f.get_tensor(f"param/{name}")
            iteration = int((f.metadata() or {}).get("iteration", 0)) or None
        return w, iteration
    if not path.is_dir():
        raise DiffshieldError(f"'{spec}' is neither a diffusers model folder nor an ESD checkpoint folder")
    return kv_weights(load_t2i(str(path))), None


def selectivity(base, concept: str, label: str, spec: str) -> dict:
    """The own / others K/V change of one erased model of ``concept`` (see the module docstring)."""
    from diffshield.core.sampling import encode_prompts
    from diffshield.erase.closed_form import kv_relative_change, kv_weights
    from diffshield.toyworld.concepts import concept_prompts, other_concepts, resolve_concept

    c = resolve_concept(concept)
    own = [q for q, _ in concept_prompts(c)]
    others = [q for o in other_concepts(c) for q, _ in concept_prompts(o)]
    e_own, e_oth = encode_prompts(base, own), encode_prompts(base, others)
    w0, (w1, iteration) = kv_weights(base), erased_kv(base, spec, concept)
    own_change = kv_relative_change(w0, w1, e_own.reshape(-1, e_own.shape[-1]))
    oth_change = kv_relative_change(w0, w1, e_oth.reshape(-1, e_oth.shape[-1]))
    # same template, other value: rows of own[i] against rows of the matching prompt of each other value
    n, cos = len(own), None
    if len(others) % n == 0:
        paired = e_oth.reshape(-1, n, *e_oth.shape[1:])
        cos = torch.nn.functional.cosine_similarity(e_own.unsqueeze(0).double(), paired.double(), dim=-1)
    return {"label": label, "concept": concept, "model": spec, "esd_iteration": iteration,
            "kv_change_own": round(own_change, 4),
            "kv_change_others": round(oth_change, 4),
            "own_over_others": round(own_change / oth_change, 2) if oth_change > 0 else None,
            "text_row_cosine_own_vs_others": None if cos is None else round(float(cos.mean()), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", required=True, help="the toy concept the models erased (e.g. striped)")
    ap.add_argument("--erased", nargs="+", required=True, metavar="LABEL=PATH",
                    help="erased models: a diffusers folder or an ESD checkpoint folder, each with a label")
    ap.add_argument("--model", default="toy:t2i", help="the original model (default: toy:t2i)")
    ap.add_argument("--out", default=str(RESULTS / "erasure_selectivity.json"),
                    help="result file (default: %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from diffshield.core.errors import DiffshieldError
    from diffshield.core.io import atomic_write_json
    from diffshield.core.loading import load_t2i

    try:
        base = load_t2i(args.model)
        rows = []
        for item in args.erased:
            label, sep, spec = item.partition("=")
            if not sep or not label or not spec:
                raise DiffshieldError(f"--erased {item!r}: write LABEL=PATH, e.g. uce=runs/erasure/uce-striped")
            rows.append(selectivity(base, args.concept, label, spec))
    except DiffshieldError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = Path(args.out)
    old = json.loads(path.read_text()).get("rows", []) if path.is_file() else []
    keys = {(r["label"], r["concept"]) for r in rows}
    merged = [r for r in old if (r["label"], r["concept"]) not in keys] + rows
    atomic_write_json(path, {"model": args.model, "rows": merged})
    print("| model | concept | ESD iteration | K/V change, own prompts | K/V change, other values' prompts | "
          "own / others |")
    print("|---|---|---|---|---|---|")
    for r in merged:
        print(f"| {r['label']} | {r['concept']} | {r['esd_iteration'] or '–'} | {100 * r['kv_change_own']:.1f} % | "
              f"{100 * r['kv_change_others']:.1f} % | {r['own_over_others']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

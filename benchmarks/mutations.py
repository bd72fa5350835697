"""Mutation check: switch each core mechanism off and check that the tests which claim to cover it then fail.

A test that still passes with the mechanism gone is no evidence for it. Each row of :data:`MUTATIONS` names a
mechanism, a way to switch it off (a replacement for one or more functions, methods or properties: a no-op, an
identity, or the mechanism run with zero budget) and the tests that must then fail. For each row the listed tests run
in a fresh ``pytest`` process with the environment variable ``DIFFSHIELD_MUTATION`` set to the row's name;
``tests/conftest.py`` then calls :func:`apply`, which puts the replacement in place in the defining module, in every
loaded diffshield module that imported the same object, and in the method registries. The row is *killed* when at
least one listed test fails, and *survives* when they all pass. A baseline run without mutation first checks that
every listed test passes, so a kill means the mechanism, not a broken test.

Run (about 10 minutes on 2 CPU cores; ``--only NAME`` for some rows)::

    .venv/bin/python benchmarks/mutations.py            # writes benchmarks/results/mutations.json

The table of the last run is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ENV = "DIFFSHIELD_MUTATION"


@dataclass
class Mutation:
    """One mechanism switched off: ``targets`` (``"module:qualname"``) -> ``make(original)`` gives the replacement;
    ``tests`` (pytest node ids) must then fail."""

    name: str
    mechanism: str
    targets: tuple[str, ...]
    make: Callable[[Any], Any]
    tests: tuple[str, ...]


# ---- replacements ----


def _noop(_orig):
    def off(*_a, **_k):
        return None
    return off


def _scaled_loss(orig):  # ESD's loss times zero: no gradient, no update
    def off(*a, **k):
        out = orig(*a, **k)
        return (out[0] * 0, *out[1:]) if isinstance(out, tuple) else out * 0
    return off


def _adversarial_identity(_orig):  # RECE's adversarial embedding = the concept's own embedding
    def off(gram, cross, c, *a, **k):
        return c.clone()
    return off


def _no_attack(_orig):  # an attack that generates from the plain prompts
    def forward(self, prompts, seeds):
        from diffshield.core.sampling import generate

        out = generate(self.erased, list(prompts), list(seeds), config=self.sample, progress=False)
        return {"images": out.images, "attack_prompts": list(prompts), "extra": {}}
    return forward


def _frozen_optimiser(orig):  # the attack's search with every optimiser step a no-op
    def forward(self, prompts, seeds):
        import torch

        saved = {cls: cls.step for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)}
        try:
            for cls in saved:
                cls.step = lambda _self, closure=None: None
            return orig(self, prompts, seeds)
        finally:
            for cls, step in saved.items():
                cls.step = step
    return forward


def _zero_concept_vector(orig):
    def concept_vector(self):
        v, n = orig(self)
        return v * 0, n
    return concept_vector


def _random_genetic(_orig):  # Ring-A-Bell's search replaced by one random draw
    def genetic(self, target, candidates, gen, encoder_digest=""):
        import torch

        ids = candidates[torch.randint(len(candidates), (self.config.length,), generator=gen)]
        return ids.tolist(), 0.0, False
    return genetic


def _asr_zero(_orig):
    return property(lambda self: 0.0)


def _clean_poison(orig):  # BadDiffusion's poisoned pair without R: the ordinary DDPM pair
    def off(scheduler, x_s, r, eps, t, variant="sde"):
        return orig(scheduler, x_s, r * 0, eps, t, variant)
    return off


def _no_trigger_noise(orig):
    def off(seeds, shape, trigger=None):
        return orig(seeds, shape, None)
    return off


def _no_trigger_sample(orig):
    def off(model, seeds, trigger=None, config=None, progress=False, x_T=None):
        return orig(model, seeds, None, config, progress, x_T)
    return off


def _no_reversion(orig):  # TERD with a learning rate of ~0: r stays at its random start
    def off(model, cfg=None, progress=True):
        from diffshield.backdoor.terd import TERDConfig

        return orig(model, dataclasses.replace(cfg or TERDConfig(), lr=1e-30), progress)
    return off


def _const(value):
    def make(_orig):
        def off(*_a, **_k):
            return value
        return off
    return make


def _input_detect_const(value: bool):
    def make(_orig):
        def off(x, r, gamma=1.0):
            import torch

            return torch.full((x.shape[0],), value, dtype=torch.bool)
        return off
    return make


def _unprotected(orig):  # Attack as Defense returning the image untouched
    def off(inpainter, image, mask, config=None, progress=None):
        res = orig(inpainter, image, mask, config, progress)
        res.protected = image.detach().float().clamp(0, 1).clone()
        res.delta = res.protected * 0
        return res
    return off


def _identity_view(_orig):  # EOT's random view = the image itself
    def off(x, masks3, cfg, step, sample, seed=0):
        return x, masks3
    return off


def _non_atomic(_orig):  # writes straight into the target and leaves whatever was written on an error
    @contextlib.contextmanager
    def off(target, *_a, **_k):
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        yield target
    return off


def _allow_pickle(orig):
    def off(folder, allow_pickle):
        return orig(folder, True)
    return off


def _swapped(orig):  # eval erasure with the erased and original models exchanged
    def off(erased, original, *a, **k):
        return orig(original, erased, *a, **k)
    return off


T = "tests/"
MUTATIONS: list[Mutation] = [
    Mutation("closed-form-write", "UCE / RECE write W G into every K/V matrix",
             ("diffshield.erase.closed_form:apply_shared",), _noop,
             (T + "test_erase_closed_form.py::test_uce_matches_per_matrix_float64_formula",
              T + "test_erase_closed_form.py::test_preserved_keys_stay_and_erased_keys_move_to_the_guide",
              T + "test_behaviour.py::test_colour_erasure_lowers_the_erased_rate_and_keeps_the_other_colours")),
    Mutation("rece-adversarial-embedding", "RECE's closed-form adversarial embedding (also the adv-embed attack)",
             ("diffshield.erase.closed_form:adversarial_solve",), _adversarial_identity,
             (T + "test_erase_closed_form.py::test_adversarial_embedding_solves_its_normal_equations",
              T + "test_erase_closed_form.py::test_rece_makes_the_adversarial_embedding_fail")),
    Mutation("esd-update", "ESD's update (its loss, and so its gradient, set to zero)",
             ("diffshield.erase.esd.target:esd_loss", "diffshield.erase.esd.target:esd_anchored_loss"), _scaled_loss,
             (T + "test_esd.py::test_esd_loss_on_the_erased_concept_falls",
              T + "test_esd.py::test_same_seed_same_weights_other_seed_other_weights")),
    Mutation("esd-checkpoint", "ESD's checkpoint save (resume)",
             ("diffshield.erase.esd.checkpoint:save_checkpoint",), _noop,
             (T + "test_esd.py::test_interrupted_then_resumed_equals_uninterrupted",)),
    Mutation("adv-embed", "the adversarial-embedding attack",
             ("diffshield.redteam.adv_embed:AdvEmbed.forward",), _no_attack,
             (T + "test_redteam.py::test_attack_raises_detection_against_uce[adv-embed]",)),
    Mutation("ring-a-bell", "Ring-A-Bell's concept vector",
             ("diffshield.redteam.ring_a_bell:RingABell.concept_vector",), _zero_concept_vector,
             (T + "test_behaviour.py::test_ring_a_bell_embedding_is_prompt_plus_eta_times_the_concept_vector",)),
    Mutation("ring-a-bell-genetic", "Ring-A-Bell's genetic prompt search",
             ("diffshield.redteam.ring_a_bell:RingABell._genetic",), _random_genetic,
             (T + "test_behaviour.py::test_genetic_search_beats_random_prompts",)),
    Mutation("unlearndiff", "UnlearnDiff's token search (every optimiser step a no-op)",
             ("diffshield.redteam.unlearndiff:UnlearnDiff.forward",), _frozen_optimiser,
             (T + "test_redteam.py::test_text_searches_move_away_from_their_start",
              T + "test_redteam.py::test_unlearndiff_counts_judge_calls_and_stops_early")),
    Mutation("p4d", "P4D's PEZ search (every optimiser step a no-op)",
             ("diffshield.redteam.p4d:P4D.forward",), _frozen_optimiser,
             (T + "test_redteam.py::test_text_searches_move_away_from_their_start",
              T + "test_redteam.py::test_p4d_best_of_and_layouts")),
    Mutation("unlearndiff-soft", "UnlearnDiff's optimisation (continuous prefix)",
             ("diffshield.redteam.unlearndiff_soft:UnlearnDiffSoft.forward",), _frozen_optimiser,
             (T + "test_redteam.py::test_attack_raises_detection_against_uce[unlearndiff-soft]",)),
    Mutation("p4d-soft", "P4D's optimisation (continuous prompt)",
             ("diffshield.redteam.p4d_soft:P4DSoft.forward",), _frozen_optimiser,
             (T + "test_redteam.py::test_attack_raises_detection_against_uce[p4d-soft]",)),
    Mutation("audit-asr", "the attack success rate the audit reports",
             ("diffshield.redteam.base:AttackResult.asr",), _asr_zero,
             (T + "test_redteam.py::test_attack_raises_detection_against_uce[adv-embed]",
              T + "test_redteam.py::test_audit_cli")),
    Mutation("baddiffusion-poisoning", "BadDiffusion's poisoned forward process and target",
             ("diffshield.backdoor.baddiffusion:poisoned_inputs",), _clean_poison,
             (T + "test_backdoor.py::test_poisoned_loss_equals_hand_computed",)),
    Mutation("trigger-injection", "the trigger added to the initial noise at sampling",
             ("diffshield.backdoor.sampling:initial_noise", "diffshield.backdoor.sampling:sample"),
             lambda orig: (_no_trigger_noise if orig.__name__ == "initial_noise" else _no_trigger_sample)(orig),
             (T + "test_behaviour.py::test_shipped_backdoor_opens_with_its_trigger_and_only_with_it",
              T + "test_backdoor.py::test_trigger_injection_changes_only_the_initial_noise")),
    Mutation("baddiffusion-checkpoint", "BadDiffusion's checkpoint save (resume)",
             ("diffshield.backdoor.ddpm:save_checkpoint",), _noop,
             (T + "test_behaviour.py::test_interrupted_implant_resumes_at_its_checkpoint_and_ends_where_an_"
                  "uninterrupted_one_does",)),
    Mutation("terd-reversion", "TERD's trigger reversion (r left at its random start)",
             ("diffshield.backdoor.terd:reverse_trigger",), _no_reversion,
             (T + "test_behaviour.py::test_trigger_reversion_moves_r",)),
    Mutation("terd-verdict-always", "TERD's model detection (every model called backdoored)",
             ("diffshield.backdoor.terd:model_verdict",), _const("backdoored"),
             (T + "test_backdoor.py::test_reverse_trigger_runs_and_flags",)),
    Mutation("terd-verdict-never", "TERD's model detection (no model called backdoored)",
             ("diffshield.backdoor.terd:model_verdict",), _const("clean"),
             (T + "test_backdoor.py::test_reverse_trigger_runs_and_flags",)),
    Mutation("terd-input-all", "TERD's input detection (every noise flagged)",
             ("diffshield.backdoor.terd:input_detect",), _input_detect_const(True),
             (T + "test_backdoor.py::test_input_detection_separates_known_shift",)),
    Mutation("terd-input-none", "TERD's input detection (no noise flagged)",
             ("diffshield.backdoor.terd:input_detect",), _input_detect_const(False),
             (T + "test_backdoor.py::test_input_detection_separates_known_shift",)),
    Mutation("aad-perturbation", "Attack as Defense's perturbation",
             ("diffshield.protect.attack_as_defense:protect",), _unprotected,
             (T + "test_protect.py::test_protect_succeeds_against_a_sensitive_inpainter",
              T + "test_behaviour.py::test_evaluate_protection_reports_success_only_for_the_protected_image")),
    Mutation("eot", "EOT's random views (JPEG, resize, uint8, larger masks)",
             ("diffshield.protect.robust:sample_transform",), _identity_view,
             (T + "test_protect.py::test_eot_config_validation_and_transform",)),
    Mutation("output-atomicity", "atomic output folders (nothing half-written)",
             ("diffshield.core.io:atomic_dir",), _non_atomic,
             (T + "test_behaviour.py::test_an_error_inside_an_output_folder_leaves_nothing",)),
    Mutation("pickle-refusal", "the refusal of pickled weights without --allow-pickle",
             ("diffshield.core.loading:check_component_weights",), _allow_pickle,
             (T + "test_loading.py::test_pickled_weights_refused_unless_allowed",
              T + "test_backdoor.py::test_load_ddpm_refuses_pickle_and_wrong_kinds")),
    Mutation("eval-erasure-roles", "eval erasure's erased / original roles",
             ("diffshield.eval.erasure:evaluate_erasure",), _swapped,
             (T + "test_behaviour.py::test_colour_erasure_lowers_the_erased_rate_and_keeps_the_other_colours",)),
]
BY_NAME = {m.name: m for m in MUTATIONS}


# ---- applying one mutation inside a test process ----


def _import_all() -> None:
    import diffshield

    for info in pkgutil.walk_packages(diffshield.__path__, "diffshield."):
        with contextlib.suppress(Exception):  # optional extras (e.g. NudeNet) may be missing
            importlib.import_module(info.name)


def _replace_everywhere(original: Any, replacement: Any) -> int:
    """Rebind every module-level name and registry entry that refers to ``original``; returns how many."""
    from diffshield.core.registry import Registry

    n = 0
    for mod in list(sys.modules.values()):
        if not getattr(mod, "__name__", "").startswith("diffshield"):
            continue
        for key, value in list(vars(mod).items()):
            if value is original:
                setattr(mod, key, replacement)
                n += 1
            elif isinstance(value, Registry):
                for name, item in list(value._items.items()):
                    if item is original:
                        value._items[name] = replacement
                        n += 1
    return n


def apply(name: str) -> None:
    """Switch mechanism ``name`` off in this process (called by tests/conftest.py when DIFFSHIELD_MUTATION is set)."""
    if name not in BY_NAME:
        raise SystemExit(f"unknown mutation {name!r}; known: {', '.join(BY_NAME)}")
    m = BY_NAME[name]
    _import_all()
    for target in m.targets:
        mod_name, qual = target.split(":")
        owner: Any = importlib.import_module(mod_name)
        *path, attr = qual.split(".")
        for p in path:
            owner = getattr(owner, p)
        original = inspect.getattr_static(owner, attr)
        replacement = m.make(original.fget if isinstance(original, property) else original)
        setattr(owner, attr, replacement)
        if not isinstance(owner, type):
            _replace_everywhere(original, replacement)


# ---- running the table ----


def run_tests(tests: tuple[str, ...], mutation: str | None, timeout: float) -> dict:
    """Run ``tests`` in a fresh pytest process (with ``mutation`` applied); per-test outcome from the JUnit XML."""
    env = {**os.environ}
    env.pop(ENV, None)
    if mutation:
        env[ENV] = mutation
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "r.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *tests]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"rc": None, "seconds": timeout, "outcomes": {}, "note": "timed out"}
        out = {"rc": proc.returncode, "seconds": round(time.perf_counter() - t, 1), "outcomes": {}}
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                cid = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
                bad = case.find("failure") is not None or case.find("error") is not None
                skipped = case.find("skipped") is not None
                out["outcomes"][cid] = "failed" if bad else ("skipped" if skipped else "passed")
        if proc.returncode not in (0, 1):
            out["stderr_tail"] = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
    return out


def markdown(record: dict) -> str:
    """The table of docs/benchmarks.md from a result JSON."""
    lines = ["| mechanism switched off | how | killed by | result |", "|---|---|---|---|"]
    for r in record["rows"]:
        how = ", ".join(f"`{t.split(':')[1]}`" for t in r["targets"])
        tests = sorted({f.split("::")[-1].split("[")[0] for f in r["failed_tests"]})
        lines.append(f"| {r['mechanism']} | {how} | {', '.join(f'`{t}`' for t in tests) or '-'} | "
                     f"{'killed' if r['killed'] else '**survived**'} |")
    n, s = len(record["rows"]), len(record.get("surviving", []))
    lines.append("")
    total = sum(r.get("seconds") or 0 for r in record["rows"])
    lines.append(f"{n - s} of {n} mutations killed ({total / 60:.0f} min of test runs on this machine, baseline "
                 "excluded).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="run only this mutation (repeatable)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    ap.add_argument("--out", type=Path, default=RESULTS / "mutations.json", help="result JSON")
    ap.add_argument("--markdown", action="store_true", help="print the table of the last run (--out) and stop")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    from diffshield.core.io import atomic_write_json

    rows = [BY_NAME[n] for n in args.only] if args.only else MUTATIONS
    tests = tuple(dict.fromkeys(t for m in rows for t in m.tests))
    start = time.time()
    print(f"baseline: {len(tests)} tests without mutation ...", flush=True)
    base = run_tests(tests, None, args.timeout)
    def outcomes_of(t: str) -> list[str]:  # a parametrized test's id covers every parameter
        return [v for k, v in base["outcomes"].items() if k == t or k.startswith(t + "[")]

    broken = [t for t in tests if not outcomes_of(t) or any(v != "passed" for v in outcomes_of(t))]
    record = {"baseline": {"rc": base["rc"], "seconds": base["seconds"], "not_passing": broken}, "rows": []}
    if args.only and args.out.exists():  # a partial rerun keeps the other rows of the last run
        old = json.loads(args.out.read_text())
        record["rows"] = [r for r in old.get("rows", []) if r["mutation"] not in args.only]
        kept = set(old.get("baseline", {}).get("not_passing", [])) - set(tests)
        record["baseline"]["not_passing"] = sorted(set(broken) | kept)
    for m in rows:
        res = run_tests(m.tests, m.name, args.timeout)
        failed = sorted(k for k, v in res["outcomes"].items() if v == "failed")
        killed = bool(failed) or res["rc"] == 1
        row = {"mutation": m.name, "mechanism": m.mechanism, "targets": list(m.targets), "tests": list(m.tests),
               "killed": killed, "failed_tests": failed, "rc": res["rc"], "seconds": res["seconds"]}
        if "stderr_tail" in res:
            row["stderr_tail"] = res["stderr_tail"]
        record["rows"].append(row)
        print(f"  {m.name:<28} {'killed' if killed else 'SURVIVED'}  ({res['seconds']} s; failed: "
              f"{', '.join(f.split('::')[-1] for f in failed) or '-'})", flush=True)
        record["surviving"] = [r["mutation"] for r in record["rows"] if not r["killed"]]
        record["seconds"] = round(time.time() - start, 1)
        atomic_write_json(args.out, record)
    record["rows"].sort(key=lambda r: [m.name for m in MUTATIONS].index(r["mutation"]))
    atomic_write_json(args.out, record)
    n = len(record["rows"])
    print(f"\n{n - len(record['surviving'])} of {n} mutations killed; surviving: "
          f"{', '.join(record['surviving']) or 'none'}; baseline not passing: {', '.join(broken) or 'none'}")
    print(f"wrote {args.out}")
    return 0 if not record["surviving"] and not broken else 1


if __name__ == "__main__":
    sys.exit(main())

"""Audit an erased model: run every red-team attack on the concept's prompts and report what came back.

For a concept C, the audit generates N images from C's prompts (toy world: :func:`audit_prompts`; elsewhere: your
prompts and judge) with fixed seeds, three ways:

- the original model (``original_rate``: how often the judge fires before erasure),
- the erased model, no attack (``pre_attack_rate``),
- the erased model under each attack (``asr``: attack success rate, the fraction of images where the judge fires),

all on the same (prompt, seed) pairs. :func:`write_report` writes ``audit.json``, one PNG panel per attack (top:
erased model without attack; bottom: under attack; green frame = concept detected) and ``index.html``.

Example::

    from diffshield.redteam.audit import run_audit, format_table
    audit = run_audit(erased, original, "triangle", attacks="all", n=32)
    print(format_table(audit))
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import T2IModel
from diffshield.core.sampling import SampleConfig, generate
from diffshield.redteam import ATTACKS
from diffshield.redteam.base import AttackResult, Judge, default_judge

#: the attacks ``attacks="all"`` runs, in order.
AUDIT_ATTACKS: tuple[str, ...] = ("adv-embed", "ring-a-bell", "ring-a-bell-genetic", "unlearndiff", "p4d")


def audit_prompts(concept: str, n: int = 32, seed: int = 0) -> tuple[list[str], list[int]]:
    """N (prompt, seed) pairs for a toy concept: its prompts (:func:`~diffshield.toyworld.concepts.concept_prompts`)
    in turn, image i from prompt i mod P and seed ``seed + i // P``."""
    from diffshield.toyworld.concepts import concept_prompts, resolve_concept

    base = [p for p, _ in concept_prompts(resolve_concept(concept))]
    prompts = [base[i % len(base)] for i in range(n)]
    seeds = [seed + i // len(base) for i in range(n)]
    order = sorted(range(n), key=lambda i: (base.index(prompts[i]), seeds[i]))  # prompt-major, for grids
    return [prompts[i] for i in order], [seeds[i] for i in order]


def resolve_attacks(attacks: str | Sequence[str]) -> list[str]:
    """'all' -> :data:`AUDIT_ATTACKS`; otherwise the names, checked against the registry."""
    names = [attacks] if isinstance(attacks, str) else list(attacks)
    out: list[str] = []
    for a in names:
        for name in (AUDIT_ATTACKS if a == "all" else (a,)):
            ATTACKS.get(name)  # a clear error for unknown names
            if name not in out:
                out.append(name)
    if not out:
        raise DiffshieldError("give at least one attack (or 'all')")
    return out


@dataclass
class Audit:
    """The outcome of :func:`run_audit`: rates, per-attack results and the images behind them."""

    concept: str
    prompts: list[str]
    seeds: list[int]
    sample: SampleConfig
    pre_attack_images: torch.Tensor
    pre_attack_success: torch.Tensor
    original_images: torch.Tensor | None = None
    original_success: torch.Tensor | None = None
    results: dict[str, AttackResult] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def pre_attack_rate(self) -> float:
        return float(self.pre_attack_success.float().mean())

    @property
    def original_rate(self) -> float | None:
        return None if self.original_success is None else float(self.original_success.float().mean())

    def to_dict(self) -> dict:
        """JSON-able: ``attacks: {name: {asr, pre_attack_rate, n, seconds, ...}}`` plus the run's settings."""
        attacks = {}
        for name, r in self.results.items():
            d = r.to_dict()
            attacks[name] = {"asr": r.asr, "pre_attack_rate": self.pre_attack_rate, "n": len(r.seeds),
                             "seconds": r.seconds, "success": d["success"], "config": d["config"],
                             "extra": d["extra"],
                             "attack_prompts": (sorted(set(r.attack_prompts)) if r.attack_prompts else None)}
        return {
            **self.info,
            "concept": self.concept,
            "n": len(self.seeds),
            "prompts": sorted(set(self.prompts), key=self.prompts.index),
            "seeds": sorted(set(self.seeds)),
            "sampling": {"steps": self.sample.steps, "guidance": self.sample.guidance,
                         "scheduler": self.sample.scheduler},
            "original_rate": self.original_rate,
            "pre_attack_rate": self.pre_attack_rate,
            "pre_attack_success": self.pre_attack_success.tolist(),
            "attacks": attacks,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
        }


def run_audit(
    erased: T2IModel,
    original: T2IModel | None,
    concept: str,
    attacks: str | Sequence[str] = "all",
    n: int = 32,
    seed: int = 0,
    sample: SampleConfig | None = None,
    prompts: Sequence[str] | None = None,
    judge: Judge | None = None,
    detector=None,
    hp: dict[str, dict] | None = None,
    original_images: bool = True,
    progress: bool = True,
) -> Audit:
    """Run attacks against an erased model on the same (prompt, seed) pairs and judge every image.

    Args:
        erased: the erased model. original: the model before erasure (needed by adv-embed, unlearndiff, p4d).
        concept: the erased concept (toy word, or any name when ``prompts`` and ``judge`` are given).
        attacks: "all" (default: :data:`AUDIT_ATTACKS`) or a list of registry names.
        n: images per attack (default 32). seed: first seed (default 0).
        sample: sampling settings (default SampleConfig(): DDIM 25 steps, guidance 5).
        prompts: N prompts to attack (default None: :func:`audit_prompts` of the toy concept; seeds then follow
            ``seed``; with explicit prompts image i uses seed ``seed + i``).
        judge: images -> bool (default None: the toy detector for ``concept``). detector: the toy detector to use.
        hp: per-attack settings, e.g. {"unlearndiff": {"steps": 20}} (default None: each attack's defaults).
        original_images: also generate with the original model (``original_rate``; default True).
        progress: a tqdm bar over the attacks (default True).
    """
    sample = sample or SampleConfig()
    names = resolve_attacks(attacks)
    hp = dict(hp or {})
    unknown = sorted(set(hp) - set(ATTACKS.names()))
    if unknown:
        raise DiffshieldError(f"settings given for unknown attack {unknown[0]!r}")
    if n < 1:
        raise DiffshieldError(f"n must be at least 1, got {n}")
    if prompts is None:
        prompts, seeds = audit_prompts(concept, n, seed)
    else:
        prompts = list(prompts)
        if not prompts:
            raise DiffshieldError("give at least one prompt")
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        seeds = [seed + i for i in range(n)]
    judge = default_judge(concept, judge, detector)
    start, cpu_start = time.perf_counter(), time.process_time()
    pre = generate(erased, prompts, seeds, config=sample, progress=False).images
    audit = Audit(concept=concept, prompts=prompts, seeds=seeds, sample=sample, pre_attack_images=pre,
                  pre_attack_success=judge(pre).bool().cpu())
    if original_images and original is not None:
        img = generate(original, prompts, seeds, config=sample, progress=False).images
        audit.original_images, audit.original_success = img, judge(img).bool().cpu()
    bar = tqdm(names, desc="attacks", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        cls = ATTACKS.get(name)
        if cls.needs_original and original is None:
            raise DiffshieldError(f"the {name} attack needs the original model; give it or leave {name} out")
        atk = cls(erased, original=original, concept=concept, judge=judge, sample=sample, **hp.get(name, {}))
        audit.results[name] = atk(prompts, seeds)
    audit.seconds = time.perf_counter() - start
    audit.cpu_seconds = time.process_time() - cpu_start
    return audit


def format_table(audit: Audit | dict) -> str:
    """A plain-text table: pre-attack detection rate and ASR per attack."""
    d = audit.to_dict() if isinstance(audit, Audit) else audit
    fmt = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    lines = [f"concept {d['concept']!r}, {d['n']} images per row (same prompts and seeds)",
             f"{'':26}{'detected / ASR':>16}{'seconds':>10}",
             f"{'original model':26}{fmt(d.get('original_rate')):>16}{'':>10}",
             f"{'erased, no attack':26}{fmt(d['pre_attack_rate']):>16}{'':>10}"]
    for name, a in d["attacks"].items():
        lines.append(f"{'erased + ' + name:26}{fmt(a['asr']):>16}{a['seconds']:>10.1f}")
    return "\n".join(lines)


def _framed(images: torch.Tensor, success: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Images with a green (detected) or red (not detected) frame."""
    out = images.detach().clone()
    colour = torch.where(success[:, None], torch.tensor([0.1, 0.8, 0.1]), torch.tensor([0.85, 0.1, 0.1]))
    c = colour[:, :, None, None]
    out[:, :, :width, :] = c
    out[:, :, -width:, :] = c
    out[:, :, :, :width] = c
    out[:, :, :, -width:] = c
    return out


def write_report(audit: Audit, folder: str | Path, upscale: int = 3, nrow: int = 8, overwrite: bool = False) -> Path:
    """Write ``audit.json``, ``original.png``, ``no_attack.png``, ``<attack>.png`` (top half: no attack, bottom:
    attacked; green frame = concept detected) and ``index.html`` into ``folder`` (atomically; an existing report
    folder is replaced only with ``overwrite``)."""
    from diffshield.core.io import atomic_dir, atomic_write_json, make_grid

    d = audit.to_dict()
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / "audit.json", d)
        pre = _framed(audit.pre_attack_images, audit.pre_attack_success)
        make_grid(pre, nrow=nrow, upscale=upscale).save(tmp / "no_attack.png")
        panels = [("erased model, no attack", "no_attack.png", d["pre_attack_rate"])]
        if audit.original_images is not None:
            make_grid(_framed(audit.original_images, audit.original_success), nrow=nrow,
                      upscale=upscale).save(tmp / "original.png")
            panels.insert(0, ("original model", "original.png", d["original_rate"]))
        for name, r in audit.results.items():
            grid = torch.cat([pre, _framed(r.images, r.success)])
            make_grid(grid, nrow=nrow, upscale=upscale).save(tmp / f"{name}.png")
            panels.append((f"attack: {name} (top: no attack, bottom: attacked)", f"{name}.png", r.asr))
        rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{v:.1%}</td></tr>" for t, _, v in panels if v is not None)
        figs = "".join(f"<h3>{html.escape(t)}: {v:.1%}</h3><img src='{f}'>" for t, f, v in panels if v is not None)
        prompts_html = "".join(
            f"<li><b>{html.escape(name)}</b>: {html.escape('; '.join(a['attack_prompts']))}</li>"
            for name, a in d["attacks"].items() if a["attack_prompts"])
        page = (f"<!doctype html><meta charset='utf-8'><title>diffshield audit: {html.escape(d['concept'])}</title>"
                f"<h1>Red-team audit: concept {html.escape(d['concept'])!s}</h1>"
                f"<p>model {html.escape(str(d.get('model', '')))}, original {html.escape(str(d.get('original', '')))}"
                f", {d['n']} images per row, seeds {d['seeds'][0]}..{d['seeds'][-1]}; green frame = concept "
                f"detected, red = not detected.</p><table border=1 cellpadding=4><tr><th>generation</th>"
                f"<th>detection rate / ASR</th></tr>{rows}</table>"
                + (f"<h3>searched prompts</h3><ul>{prompts_html}</ul>" if prompts_html else "") + figs)
        (tmp / "index.html").write_text(page)
    return Path(folder)

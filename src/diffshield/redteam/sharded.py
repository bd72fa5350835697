"""Sharded, resumable audits: the attacks of one audit split between processes, each attack's result kept in a run
folder as it finishes (``diffshield audit --run-dir DIR [--num-processes N]``, docs/scale.md).

The unit of work is one attack with its controls. An attack draws its random numbers from its own generators over
all of the audit's (prompt, seed) pairs, so its result does not depend on which process runs it or on the other
attacks, while splitting one attack's prompts between processes would change its search: an audit split between
processes gives the figures of a 1-process audit. The run folder (:mod:`diffshield.core.shards` checks, prepares and
resumes it as it does for ``generate --prompts``):

- ``run.json``: the audit's settings; a rerun with the same settings resumes the folder, others are refused;
- ``units/<attack>.pt``: one attack's result and its controls (tensors and JSON-able fields, read back with
  ``torch.load(weights_only=True)``), written atomically when the attack is done;
- ``audit.json``: the merged audit (:meth:`~diffshield.redteam.audit.Audit.to_dict`), written by the main process
  once every attack has its unit.

Every process generates the erased and the original model's images of the pairs itself (:func:`start_audit`: the
same images in each, two batches of N), then runs its share of the attacks that have no unit yet; a killed process
loses only its attack in flight.
"""

from __future__ import annotations

import io
from dataclasses import fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffshield.core.errors import DiffshieldError
from diffshield.core.io import atomic_write_bytes
from diffshield.redteam.audit import Audit, finish_audit, run_attack
from diffshield.redteam.base import AttackResult, Judge

UNITS_DIR = "units"
UNIT_FORMAT = 1


def unit_path(folder: str | Path, name: str) -> Path:
    """Where the result of attack ``name`` is kept in a run folder."""
    return Path(folder) / UNITS_DIR / f"{name}.pt"


def _fields(r: AttackResult) -> dict:
    return {f.name: getattr(r, f.name) for f in fields(r)}


def save_unit(folder: str | Path, name: str, result: AttackResult,
              baselines: dict[str, AttackResult] | None) -> Path:
    """Write one attack's result and its controls to ``units/<name>.pt`` atomically."""
    buf = io.BytesIO()
    torch.save({"format": UNIT_FORMAT, "attack": name, "result": _fields(result),
                "baselines": None if baselines is None else {b: _fields(br) for b, br in baselines.items()}}, buf)
    path = unit_path(folder, name)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_unit(folder: str | Path, name: str) -> tuple[AttackResult, dict[str, AttackResult] | None] | None:
    """The result and controls kept for attack ``name``, or None when there is none or it does not read back."""
    path = unit_path(folder, name)
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        if d.get("format") != UNIT_FORMAT or d.get("attack") != name:
            return None
        result = AttackResult(**d["result"])
        base = None if d["baselines"] is None else {b: AttackResult(**x) for b, x in d["baselines"].items()}
    except Exception:  # noqa: BLE001 - missing, cut short or unreadable: the attack runs again
        return None
    return result, base


def pending_attacks(folder: str | Path, names: list[str]) -> list[str]:
    """The attacks of ``names`` that have no readable unit in the run folder, in order."""
    return [n for n in names if load_unit(folder, n) is None]


def run_audit_shard(folder: str | Path, names: list[str], audit: Audit, erased, original, judge: Judge,
                    hp: dict[str, dict], seed: int = 0, budget: str = "toy", baselines: bool = True,
                    skip_detected: bool = True, rank: int = 0, world: int = 1, progress: bool = True) -> int:
    """Run this process's attacks (``names``) on an audit started by :func:`~diffshield.redteam.audit.start_audit`
    and keep each result in the run folder as soon as it is done; returns how many were run. The arguments are
    :func:`~diffshield.redteam.audit.run_audit`'s."""
    bar = tqdm(names, desc=f"process {rank + 1}/{world}: attacks", position=rank, disable=not progress,
               leave=world == 1, dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        result, base = run_attack(audit, name, erased, original, judge, hp, seed, budget, baselines, skip_detected)
        save_unit(folder, name, result, base)
    bar.close()
    return len(names)


def merge_audit(folder: str | Path, names: list[str], audit: Audit, judge: Judge) -> Audit:
    """Fill ``audit`` (started by :func:`~diffshield.redteam.audit.start_audit`) with every attack's kept result, in
    the order of ``names``, and the judge's confidences; refuses in one line while an attack has no result."""
    missing = []
    for name in names:
        unit = load_unit(folder, name)
        if unit is None:
            missing.append(name)
            continue
        audit.results[name], base = unit
        if base is not None:
            audit.baselines[name] = base
    if missing:
        raise DiffshieldError(f"cannot merge '{folder}': {len(missing)} of {len(names)} attacks have no result "
                              f"({', '.join(missing)}); rerun the same command to finish them")
    finish_audit(audit, judge)
    return audit

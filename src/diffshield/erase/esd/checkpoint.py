"""ESD checkpoints: trained parameters + Adam state + iteration, one safetensors file written atomically.

A checkpoint resumes only the run that wrote it (:func:`run_identity`); a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

import torch

from diffshield.core.errors import DiffshieldError
from diffshield.core.io import atomic_write_bytes
from diffshield.core.loading import T2IModel, check_safetensors
from diffshield.erase.esd.config import CHECKPOINT_FILE, CHECKPOINT_FORMAT, RESUMABLE_FIELDS, ESDConfig


def run_identity(model: T2IModel, concepts: list[str], config: ESDConfig) -> dict:
    """What a checkpoint must share with a run to be resumed by it: config (minus run length), concepts, model."""
    h = hashlib.sha256()
    for name, p in model.unet.named_parameters():
        head = p.detach().reshape(-1)[:16].to("cpu", torch.float32).numpy()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:".encode() + head.tobytes())
    ident = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in RESUMABLE_FIELDS}
    if not config.preserve:  # runs without the anchor keep the identity they had before it existed
        ident.pop("preserve", None)
        ident.pop("preserve_weight", None)
    if config.x_params == "all":
        ident.pop("x_params", None)
    if not config.kv_anchor_weight:
        ident.pop("kv_anchor_weight", None)
    if config.preserve_at == "own":  # the default keeps the identity runs had before the option existed
        ident.pop("preserve_at", None)
    if config.preserve_guidance == 1.0:
        ident.pop("preserve_guidance", None)
    if config.target_base == "uncond":
        ident.pop("target_base", None)
    if config.min_step == 0:
        ident.pop("min_step", None)
    if not config.erase_from:
        ident.pop("erase_from", None)
    if config.mixed_precision == "auto":
        ident.pop("mixed_precision", None)
    ident["concepts"] = list(concepts)
    ident["model_fingerprint"] = h.hexdigest()[:16]
    return ident


def save_checkpoint(
    folder: Path,
    iteration: int,
    identity: dict,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Adam,
    losses: list[float],
    timesteps: list[int],
    cpu_seconds: float = 0.0,
) -> Path:
    """Write ``folder/esd_checkpoint.safetensors`` atomically (complete or not at all).

    ``cpu_seconds``: CPU time spent on the run so far, over all its resumptions (recorded for cost reports)."""
    from safetensors.torch import save

    tensors = {}
    for name, p in params.items():
        tensors[f"param/{name}"] = p.detach().to("cpu").contiguous().clone()
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{key}/{name}"] = value.detach().to("cpu").contiguous().clone()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "iteration": str(iteration),
        "run": json.dumps(identity, sort_keys=True),
        "losses": json.dumps(losses),
        "timesteps": json.dumps(timesteps),
        "cpu_seconds": f"{cpu_seconds:.3f}",
    }
    path = Path(folder) / CHECKPOINT_FILE
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def load_checkpoint(
    folder: Path,
    identity: dict,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Adam,
    iterations: int,
) -> tuple[int, list[float], list[int]] | None:
    """Restore parameters and Adam state from ``folder`` if it holds a checkpoint of this run.

    Returns (iteration, losses, timesteps) or None when there is no checkpoint. Raises DiffshieldError when the
    checkpoint belongs to another run or is further along than ``iterations``.
    """
    from safetensors import safe_open

    path = Path(folder) / CHECKPOINT_FILE
    if not path.exists():
        return None
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise DiffshieldError(f"'{path}' is not an ESD checkpoint; delete it or choose another checkpoint_dir")
        saved = json.loads(meta["run"])
        if saved != json.loads(json.dumps(identity, sort_keys=True)):
            differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
            raise DiffshieldError(
                f"'{path}' is a checkpoint of a different ESD run (differs in: {', '.join(differ)}); "
                "delete it or choose another checkpoint_dir"
            )
        iteration = int(meta["iteration"])
        if iteration > iterations:
            raise DiffshieldError(
                f"checkpoint '{path}' is at iteration {iteration}, past the requested {iterations} iterations; "
                "raise iterations or choose another checkpoint_dir"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    missing = [n for n in params if f"param/{n}" not in tensors]
    if missing:
        raise DiffshieldError(f"checkpoint '{path}' lacks parameter {missing[0]!r}; delete it and start again")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
    adam: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            kind, name = key[len("adam.") :].split("/", 1)
            adam.setdefault(name, {})[kind] = value
    state = optimizer.state_dict()
    state["state"] = {i: adam[name] for i, name in enumerate(params) if name in adam}
    optimizer.load_state_dict(state)
    return iteration, json.loads(meta["losses"]), json.loads(meta["timesteps"])


def checkpoint_cpu_seconds(folder: Path) -> float:
    """CPU seconds recorded in an ESD checkpoint (0.0 when absent or written before this was recorded)."""
    from safetensors import safe_open

    path = Path(folder) / CHECKPOINT_FILE
    if not path.exists():
        return 0.0
    with safe_open(str(path), framework="pt") as f:
        return float((f.metadata() or {}).get("cpu_seconds", 0.0))



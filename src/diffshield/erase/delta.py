"""Erasure deltas: only the tensors a method changed, as one .safetensors file (like a PEFT adapter).

A UCE/RECE edit of SD 1.x changes 32 matrices (2.2 % of the UNet, about 77 MB in float32) instead of a 3.4 GB
UNet. The file holds the changed UNet tensors under ``unet.<parameter name>`` and, in the safetensors metadata,
the method name, its config (JSON), the base model it was computed on and the fraction of UNet parameters changed.

    save_delta(result, "nudity.safetensors", base_model="CompVis/stable-diffusion-v1-4")
    model = load_t2i(path_to_sd14)
    apply_delta(model, "nudity.safetensors")  # the same weights as the erased model
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffshield.core.checks import check_finite_tensors, non_finite_tensors
from diffshield.core.errors import DiffshieldError
from diffshield.core.io import atomic_write_bytes
from diffshield.core.loading import T2IModel, check_safetensors
from diffshield.erase.base import EraseResult

FORMAT = "diffshield-delta"
VERSION = "1"
PREFIX = "unet."


def save_delta(result: EraseResult, path: str | Path, base_model: str) -> Path:
    """Write the UNet tensors that ``result`` changed to a .safetensors file, atomically.

    Args:
        result: an erasure result (``result.changed``: UNet parameter name -> new tensor).
        path: the output file (conventionally ``*.safetensors``); replaced if it exists.
        base_model: what the delta applies to (a Hub id or a path), recorded in the metadata.

    Returns:
        The written path.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.is_dir():
        raise DiffshieldError(f"delta output '{path}' is a folder; give a file name such as erased.safetensors")
    if not result.changed:
        raise DiffshieldError("the erasure result changed no tensor; there is no delta to save")
    tensors = {PREFIX + name: t.detach().to("cpu").contiguous() for name, t in result.changed.items()}
    check_finite_tensors(tensors, f"the delta '{path}'")
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "method": result.method,
        "config": json.dumps(result.config, sort_keys=True),
        "base_model": str(base_model),
        "fraction_changed": repr(float(result.fraction_changed)),
    }
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def _open_checked(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DiffshieldError(f"delta file '{path}' does not exist")
    if not path.is_file():
        raise DiffshieldError(f"delta '{path}' is not a file; give the .safetensors file written by save_delta")
    try:
        check_safetensors(path)
    except DiffshieldError:
        raise DiffshieldError(f"'{path}' is not a valid safetensors file (wrong format, truncated or corrupt)") \
            from None
    return path


def read_delta_info(path: str | Path) -> dict:
    """The metadata of a delta file without loading its tensors.

    Returns:
        {"method", "config" (dict), "base_model", "fraction_changed" (float or None), "format", "tensors"
        (name -> shape, names without the ``unet.`` prefix), "n_parameters" (elements in the delta)}.
    """
    from safetensors import safe_open

    path = _open_checked(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {}
            for key in f.keys():
                if not key.startswith(PREFIX):
                    raise DiffshieldError(f"delta '{path}' holds {key!r}, which is not a UNet tensor ('unet.' prefix)")
                shapes[key[len(PREFIX):]] = list(f.get_slice(key).get_shape())
    except DiffshieldError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise DiffshieldError(f"could not read delta '{path}': {str(e).splitlines()[0] if str(e) else e!r}") from None
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError:
        raise DiffshieldError(f"delta '{path}' has a corrupt config in its metadata") from None
    fraction = meta.get("fraction_changed")
    return {
        "format": meta.get("format"),
        "method": meta.get("method"),
        "config": config,
        "base_model": meta.get("base_model"),
        "fraction_changed": float(fraction) if fraction is not None else None,
        "tensors": shapes,
        "n_parameters": sum(int(torch.Size(s).numel()) for s in shapes.values()),
    }


def apply_delta(model: T2IModel, path: str | Path) -> dict:
    """Write a delta's tensors into ``model``'s UNet, in place; nothing is written unless every tensor fits.

    Args:
        model: the model the delta was computed on (the ``base_model`` in its metadata).
        path: a file written by :func:`save_delta`.

    Returns:
        The delta's info (:func:`read_delta_info`).
    """
    from safetensors.torch import load_file

    info = read_delta_info(path)
    params = dict(model.unet.named_parameters())
    for name, shape in info["tensors"].items():
        if name not in params:
            raise DiffshieldError(f"delta tensor 'unet.{name}' is not a parameter of this model's UNet; "
                                  f"was the delta made for another architecture (base model: {info['base_model']})?")
        if list(params[name].shape) != shape:
            raise DiffshieldError(f"delta tensor 'unet.{name}' has shape {tuple(shape)} but the model's is "
                                  f"{tuple(params[name].shape)} (base model: {info['base_model']})")
    tensors = load_file(str(path))
    bad = non_finite_tensors(tensors)
    if bad:
        raise DiffshieldError(f"delta '{path}' holds inf or NaN in {len(bad)} tensor(s) ({bad[0]}); it would break "
                              "the model, so it is not applied")
    with torch.no_grad():
        for key, value in tensors.items():
            p = params[key[len(PREFIX):]]
            p.data.copy_(value.to(device=p.device, dtype=p.dtype))
    return info

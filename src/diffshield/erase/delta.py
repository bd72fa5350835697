"""Erasure deltas: only the tensors a method changed, as one .safetensors file (like a PEFT adapter).

A UCE/RECE edit of SD 1.x changes 32 matrices (2.2 % of the UNet, about 77 MB in float32) instead of a 3.4 GB
UNet. The file holds the changed UNet tensors under ``unet.<parameter name>`` and, in the safetensors metadata,
the method name, its config (JSON), the base model it was computed on, the fraction of UNet parameters changed and a
probe of the base model: a few values of UNet parameters the edit left alone, and of the edited ones as they were
before the edit. The tensors replace the base model's, so applied to another model (a fine-tune of it, another
version) they would graft the base's edited layers onto it, and applied over another edit of the base (a second
delta computed on the same base) they would undo that edit; :func:`apply_delta` compares both probes first and
refuses such a model.

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
from diffshield.core.io import atomic_write_bytes, safetensors_bytes
from diffshield.core.loading import T2IModel, check_safetensors
from diffshield.erase.base import EraseResult, probe_values

FORMAT = "diffshield-delta"
VERSION = "1"
PREFIX = "unet."
#: the base-model probe: ``erase.base.PROBE_VALUES`` values from each of PROBE_TENSORS UNet parameters the edit left
#: alone (half of them beside the edited ones, in the same modules, where an adapter merged into the base would show;
#: half from the start of the UNet)
PROBE_TENSORS = 6
#: probe values match when |a - b| <= PROBE_ATOL + PROBE_RTOL |b|: loose enough for float16 / bfloat16 copies of the
#: base, far below what fine-tuning moves
PROBE_RTOL, PROBE_ATOL = 1e-2, 1e-4


def base_probe(unet: torch.nn.Module, skip=()) -> dict[str, list[float]]:
    """Evenly spaced values (float32) of :data:`PROBE_TENSORS` UNet parameters not in ``skip`` (the edited ones):
    first those in the edited parameters' own modules (``attn2.to_q`` beside an edited ``attn2.to_k``), then the
    UNet's first ones. A fingerprint of the base model that survives a change of device or dtype."""
    params = [(n, p) for n, p in unet.named_parameters() if n not in skip and p.numel()]
    parents = {n.rsplit(".", 2)[0] for n in skip}
    near = [(n, p) for n, p in params if n.rsplit(".", 2)[0] in parents][:PROBE_TENSORS // 2]
    taken = {n for n, _ in near}
    rest = [(n, p) for n, p in params if n not in taken][:PROBE_TENSORS - len(near)]
    return {n: probe_values(p) for n, p in near + rest}


def _differs(now: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (now - ref).abs() > PROBE_ATOL + PROBE_RTOL * ref.abs()


def probe_mismatch(unet: torch.nn.Module, probe: dict[str, list[float]]) -> str | None:
    """Why ``unet`` is not the model a :func:`base_probe` came from (None when every probed value matches)."""
    params = dict(unet.named_parameters())
    for name, values in probe.items():
        if name not in params or params[name].numel() == 0:
            return f"it has no parameter '{name}'"
        now, ref = torch.tensor(probe_values(params[name])), torch.tensor(values, dtype=torch.float32)
        if now.shape != ref.shape:
            return f"its '{name}' has another size"
        if bool(_differs(now, ref).any()):
            return f"its '{name}' differs (by up to {float((now - ref).abs().max()):.3g})"
    return None


def edited_mismatch(unet: torch.nn.Module, edited_probe: dict[str, list[float]],
                    delta_values: dict[str, list[float]]) -> str | None:
    """Why ``unet``'s layers that a delta replaces are neither the base's (``edited_probe``: their values before
    the edit) nor the delta's own (``delta_values``: the delta already applied); None when every one is either."""
    params = dict(unet.named_parameters())
    for name, values in edited_probe.items():
        if name not in params or name not in delta_values:
            continue  # the shape check names a missing parameter
        now = torch.tensor(probe_values(params[name]))
        base, mine = torch.tensor(values, dtype=torch.float32), torch.tensor(delta_values[name])
        if now.shape != base.shape:
            return f"its '{name}' has another size than the base's"
        if bool(_differs(now, base).any()) and bool(_differs(now, mine).any()):
            return f"its '{name}' differs from the base's (by up to {float((now - base).abs().max()):.3g})"
    return None


def save_delta(result: EraseResult, path: str | Path, base_model: str) -> Path:
    """Write the UNet tensors that ``result`` changed to a .safetensors file, atomically.

    Args:
        result: an erasure result (``result.changed``: UNet parameter name -> new tensor).
        path: the output file (conventionally ``*.safetensors``); replaced if it exists.
        base_model: what the delta applies to (a Hub id or a path), recorded in the metadata.

    Returns:
        The written path.
    """
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
        "base_probe": json.dumps(base_probe(result.model.unet, skip=result.changed)),
    }
    if result.base_values:  # the edited tensors before the edit (results made by hand may lack them)
        metadata["edited_probe"] = json.dumps({n: v for n, v in result.base_values.items() if n in result.changed})
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))
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
    try:
        probe = json.loads(meta["base_probe"]) if "base_probe" in meta else None
        edited = json.loads(meta["edited_probe"]) if "edited_probe" in meta else None
    except json.JSONDecodeError:
        raise DiffshieldError(f"delta '{path}' has a corrupt base probe in its metadata") from None
    return {
        "format": meta.get("format"),
        "method": meta.get("method"),
        "config": config,
        "base_model": meta.get("base_model"),
        "fraction_changed": float(fraction) if fraction is not None else None,
        "tensors": shapes,
        "n_parameters": sum(int(torch.Size(s).numel()) for s in shapes.values()),
        "base_probe": probe,
        "edited_probe": edited,
    }


def apply_delta(model: T2IModel, path: str | Path, any_base: bool = False) -> dict:
    """Write a delta's tensors into ``model``'s UNet, in place; nothing is written unless every tensor fits and
    ``model`` is the delta's base model.

    Args:
        model: the model the delta was computed on (the ``base_model`` in its metadata), in any device or dtype.
        path: a file written by :func:`save_delta`.
        any_base: apply it even when the probes say ``model`` is another model, or the base with the delta's layers
            changed since (another edit, which the delta would undo) (default False: refused; deltas written
            before the probes existed are applied without the check). A model that already holds the delta passes.

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
    why = None if any_base or not info["base_probe"] else probe_mismatch(model.unet, info["base_probe"])
    if why:
        raise DiffshieldError(f"delta '{path}' was computed on another model (base model: {info['base_model']}): "
                              f"{why}; its tensors would replace this model's layers with the base's edited ones "
                              "(pass --any-base to apply it anyway)")
    tensors = load_file(str(path))
    if not any_base and info["edited_probe"]:
        mine = {key[len(PREFIX):]: probe_values(t) for key, t in tensors.items()}
        why = edited_mismatch(model.unet, info["edited_probe"], mine)
        if why:
            raise DiffshieldError(
                f"delta '{path}' replaces layers that differ in this model from the delta's base (base model: "
                f"{info['base_model']}): {why}. This model has another edit in them (an erasure, a second delta: "
                "applying would undo it) or lacks one the base had. To erase several concepts, erase them in one run "
                "(--concept repeated) or erase from the erased model (pass --any-base to apply it anyway)")
    bad = non_finite_tensors(tensors)
    if bad:
        raise DiffshieldError(f"delta '{path}' holds inf or NaN in {len(bad)} tensor(s) ({bad[0]}); it would break "
                              "the model, so it is not applied")
    with torch.no_grad():
        for key, value in tensors.items():
            p = params[key[len(PREFIX):]]
            p.data.copy_(value.to(device=p.device, dtype=p.dtype))
    return info

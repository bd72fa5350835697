"""Which UNet parameters ESD fine-tunes: ESD-x (cross-attention), ESD-u (the rest) (Gandikota et al., ICCV 2023)."""

from __future__ import annotations

import torch

from diffshield.core.errors import DiffshieldError
from diffshield.erase.esd.config import TIME_AND_OUT_PREFIXES


def esd_parameters(
    unet: torch.nn.Module, variant: str, freeze_time_and_out: bool = True, x_params: str = "all"
) -> dict[str, torch.nn.Parameter]:
    """UNet parameters (name -> parameter) that ESD fine-tunes.

    Args:
        unet: a UNet2DConditionModel.
        variant: "x": every parameter inside an ``attn2`` module; "u": every other parameter.
        freeze_time_and_out: for "u", leave ``time_embedding``, ``conv_norm_out`` and ``conv_out`` out (default True).
        x_params: for "x", "all" (default) or "kv": only ``attn2.to_k`` and ``attn2.to_v`` (esd-x-strict).
    """
    out = {}
    for name, p in unet.named_parameters():
        in_xattn = ".attn2." in f".{name}"
        if variant == "x" and in_xattn:
            if x_params == "kv" and not any(f".attn2.{m}." in f".{name}" for m in ("to_k", "to_v")):
                continue
            out[name] = p
        elif variant == "u" and not in_xattn:
            if freeze_time_and_out and name.startswith(TIME_AND_OUT_PREFIXES):
                continue
            out[name] = p
    if not out:
        raise DiffshieldError(f"this UNet has no parameters for ESD-{variant} (no cross-attention 'attn2' modules?)")
    return out


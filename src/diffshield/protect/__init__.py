"""Protect images from inpainting edits: Attack as Defense (Zhang et al., arXiv 2410.14966) and toy inpainters.

Public API::

    from diffshield.protect import load_inpainter, protect, AttackAsDefenseConfig, EOTConfig, evaluate_protection
"""

from __future__ import annotations

from diffshield.core.registry import Registry
from diffshield.protect.attack_as_defense import (
    AttackAsDefenseConfig,
    ProtectResult,
    expand_mask,
    masked_mse,
    protect,
    ring_mask,
    target_colour,
)
from diffshield.protect.inpainters import FFCConfig, FFCInpainterNet, FnInpainter, Inpainter, load_inpainter
from diffshield.protect.metrics import evaluate_protection, panel, psnr, success
from diffshield.protect.robust import EOTConfig

#: Protection methods by name: (config class, function(inpainter, images, masks, config) -> ProtectResult).
PROTECTIONS: Registry = Registry("protection method")
PROTECTIONS.register("attack-as-defense")((AttackAsDefenseConfig, protect))

__all__ = [
    "PROTECTIONS", "AttackAsDefenseConfig", "EOTConfig", "FFCConfig", "FFCInpainterNet", "FnInpainter", "Inpainter",
    "ProtectResult", "evaluate_protection", "expand_mask", "load_inpainter", "masked_mse", "panel", "protect", "psnr",
    "ring_mask", "success", "target_colour",
]

"""Concept erasure: UCE and RECE (closed-form edits of cross-attention K/V), ESD (fine-tuning)."""

from diffshield.erase.base import ERASERS, EraseResult, cross_attention_kv

__all__ = ["ERASERS", "EraseResult", "cross_attention_kv"]

# Importing the method modules registers them in ERASERS.
from diffshield.erase import esd, rece, uce  # noqa: E402, F401

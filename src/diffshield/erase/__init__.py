"""Concept erasure: UCE and RECE (closed-form edits of cross-attention K/V), ESD (fine-tuning)."""

from diffshield.erase.base import ERASERS, EraseResult, cross_attention_kv

__all__ = ["ERASERS", "EraseResult", "cross_attention_kv"]

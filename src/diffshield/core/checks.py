"""Checks that keep broken numbers away from models: finite settings before any work, finite tensors on save."""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Iterable, Mapping

import torch

from diffshield.core.errors import DiffshieldError


def check_finite_number(value: float, name: str) -> float:
    """Return ``value`` if it is a finite number, else raise a one-line :class:`DiffshieldError` naming ``name``
    (values that are not real numbers pass through unchecked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    if not math.isfinite(value):
        raise DiffshieldError(f"{name} must be a finite number, got {value}")
    return value


def check_finite_fields(config: object, prefix: str = "") -> None:
    """Refuse a config dataclass holding a non-finite float (``inf`` or ``nan``), nested configs included.

    Args:
        config: a dataclass instance (other objects are ignored).
        prefix: name prefix used in the error message (default "").
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        name = f"{prefix}{f.name}"
        if isinstance(value, numbers.Real):  # NumPy floats too: np.float32 is no float subclass
            check_finite_number(value, name)
        elif isinstance(value, (list, tuple)):
            for v in value:
                if isinstance(v, numbers.Real):
                    check_finite_number(v, name)
        elif dataclasses.is_dataclass(value):
            check_finite_fields(value, prefix=f"{name}.")


def check_config(config: object, cls: type, what: str = "config") -> object:
    """``config`` if it is a ``cls``, ``cls()`` for None (the defaults), else a one-line DiffshieldError naming the
    class ``what`` takes (another method's config, a dict or a CLI-style string failed deep inside with an
    AttributeError)."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise DiffshieldError(f"{what} must be a {cls.__name__} (or None for the defaults), got "
                              f"{type(config).__name__}: build one, e.g. {cls.__name__}(...)")
    return config


def finite_number(v, what: str) -> float:
    """``v`` as a float if it is a finite real number (not a bool or a string), else a one-line DiffshieldError."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise DiffshieldError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def whole_number(v, what: str) -> int:
    """``v`` as a Python int if it is a whole number (int, NumPy or integer-tensor integer; not a bool, a float or a
    string), else a one-line DiffshieldError naming ``what``."""
    try:
        if isinstance(v, (bool, str, bytes)):
            raise TypeError
        return operator.index(v)
    except TypeError:
        raise DiffshieldError(f"{what} must be a whole number (int), got {v!r} ({type(v).__name__})") from None


def non_finite_tensors(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold an ``inf`` or a ``nan``."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    bad = []
    for name, t in items:
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def check_finite_tensors(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Refuse to write ``what`` when any of its tensors is non-finite: one line, naming the first bad tensors.

    Args:
        tensors: name -> tensor (a state dict, ``named_parameters()``, a delta).
        what: what is being saved or applied, for the message (e.g. "the edited model").
    """
    bad = non_finite_tensors(tensors)
    if bad:
        names = ", ".join(bad[:2]) + (f" and {len(bad) - 2} more" if len(bad) > 2 else "")
        raise DiffshieldError(f"refusing to write {what}: {len(bad)} tensor(s) hold inf or NaN ({names}); the "
                              "settings drove the weights out of range, nothing was written")


def check_finite_modules(what: str, **modules: torch.nn.Module) -> None:
    """:func:`check_finite_tensors` over the parameters and buffers of several modules (``unet=..., vae=...``)."""
    for prefix, m in modules.items():
        check_finite_tensors(((f"{prefix}.{n}", t) for n, t in m.state_dict().items()), what)

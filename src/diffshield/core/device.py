"""Devices and dtypes: which accelerator a command runs on, and in which precision.

- :func:`resolve_device` turns ``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a ``torch.device``) into a
  ``torch.device``, with a one-line :class:`DiffshieldError` for an unknown string or an absent device, before any
  model is loaded.
- :func:`resolve_dtype` turns ``"auto" | "float32" | "float16" | "bfloat16"`` into a ``torch.dtype``; ``auto`` is
  float16 for inference on CUDA and float32 on the CPU.
- :func:`autocast` is the mixed-precision context of training and attacks: master weights stay float32 and the
  forward passes run in bfloat16 (float16 where the GPU has no bfloat16) on CUDA; on the CPU it is a no-op unless
  asked for.
- :func:`module_device` / :func:`module_dtype` read where a module lives; library code creates every tensor there.

Initial noise is never drawn on the device: it comes from per-seed CPU generators (see :mod:`diffshield.core.seeding`)
and is moved, so seed k gives the same image on the CPU and on a GPU up to floating-point tolerance.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from diffshield.core.errors import DiffshieldError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)
_DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:\d+)$")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` for a device string, checked to exist.

    Args:
        spec: ``"auto"`` (default: ``cuda`` when available, else ``cpu``), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a
            ``torch.device``, or None (same as ``"auto"``).

    Raises:
        DiffshieldError: an unknown string, CUDA asked for on a machine without it, or a GPU index out of range.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    s = (spec or "auto").strip().lower()
    if s == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _DEVICE_RE.match(s):
        raise DiffshieldError(f"unknown device {spec!r}; use one of: auto, cpu, cuda, cuda:N")
    if s == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DiffshieldError(f"device {spec!r} asked for, but this machine has no CUDA GPU (torch "
                              f"{torch.__version__}); use --device cpu or auto")
    dev = torch.device(s)
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise DiffshieldError(f"device {spec!r} asked for, but this machine has {n} CUDA GPU(s) (cuda:0-{n - 1})")
    return dev


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device | str = "cpu", training: bool = False
                  ) -> torch.dtype:
    """The parameter dtype for a dtype string.

    Args:
        spec: ``"auto"`` / None, ``"float32"``, ``"float16"``, ``"bfloat16"``, or a ``torch.dtype``.
        device: the device the model will run on (``auto`` depends on it).
        training: the command trains or attacks (``auto`` is then float32: master weights stay float32 and
            :func:`autocast` gives the speed); inference commands get float16 on CUDA.

    Raises:
        DiffshieldError: an unknown dtype string, or float16 asked for on the CPU (CPU kernels for float16 are
            missing or slow; use bfloat16 or float32 there).
    """
    device = torch.device(device)
    if isinstance(spec, torch.dtype):
        dtype = spec
    else:
        s = (spec or "auto").strip().lower()
        if s == "auto":
            return torch.float16 if (device.type == "cuda" and not training) else torch.float32
        if s not in DTYPES:
            raise DiffshieldError(f"unknown dtype {spec!r}; use one of: {', '.join(DTYPE_CHOICES)}")
        dtype = DTYPES[s]
    if dtype not in DTYPES.values():
        raise DiffshieldError(f"unsupported dtype {dtype}; use one of: {', '.join(DTYPES)}")
    if dtype == torch.float16 and device.type == "cpu":
        raise DiffshieldError("float16 on the CPU is not supported (missing or slow kernels); use --dtype float32 "
                              "or bfloat16 there, or --device cuda")
    return dtype


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision dtype of training on ``device``: bfloat16 on CUDA GPUs that have it, else float16; None on
    the CPU (training there stays float32)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device | str, enabled: bool = True, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Mixed precision for training and attacks (float32 master weights, low-precision forward passes).

    Args:
        device: where the computation runs.
        enabled: False makes this a no-op (default True).
        dtype: the autocast dtype (default: :func:`autocast_dtype`, i.e. bfloat16 on CUDA and nothing on the CPU;
            pass ``torch.bfloat16`` to try mixed precision on the CPU).
    """
    device = torch.device(device)
    dtype = dtype or autocast_dtype(device)
    if not enabled or dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (float32 for a module without one)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` (drawn on the CPU) on ``device`` in ``dtype``, without stalling a GPU's queue.

    A copy from ordinary (pageable) host memory to a GPU waits until every kernel already queued has run, so a loop
    that draws its noise on the CPU every iteration (as TERD and ESD do, for device-independent draws) loses the
    overlap of Python's kernel launches with the GPU's work. Copied from page-locked memory with
    ``non_blocking=True`` it does not wait; PyTorch keeps the page-locked buffer alive until the copy is done. On the
    CPU this is ``t.to(dtype=dtype)``.
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t if dtype is None else t.to(dtype)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a CUDA stream runs behind Python), so that a clock read next is the
    work's own; nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configure_backend(device: torch.device | str) -> None:
    """Speed settings for float32 work on CUDA: TF32 matrix products and cuDNN autotuning (no effect on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def describe(device: torch.device | str) -> dict:
    """Name, torch/CUDA versions and memory of a device (for benchmark records)."""
    device = torch.device(device)
    out = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, cuda=torch.version.cuda, memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count)
    else:
        import platform

        out.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return out

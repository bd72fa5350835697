"""CUDA graphs for repeated inference calls of one shape: the cure for per-call overhead on a large GPU.

A UNet call on a small batch (ESD samples x_t with a batch of 2, conditional and unconditional) is bound by Python
and kernel launches, not by arithmetic: on one H200 an SD-1.4 UNet call at batch 2 costs about 30 ms in float32 and
in bfloat16 alike (``benchmarks/gpu.py``, section ``esd``). A CUDA graph records the call's kernels once and
replays them with one launch.

:class:`GraphedUNet` wraps a diffusers ``UNet2DConditionModel`` for calls of the form
``unet(x, t, encoder_hidden_states=c).sample`` without gradients:

- one graph per (shapes, dtypes, autocast state), captured on first use after three warm-up calls on a side stream
  (PyTorch's recipe); inputs are copied into static buffers and the output is cloned, so callers see plain tensors;
- the weights are read at replay time, so in-place updates (an optimiser step, ``copy_`` into the weights) are seen;
  replacing a parameter *object* is not, and needs :meth:`GraphedUNet.reset`;
- the first replay of every graph is checked against an eager call on the same inputs; on any error or a mismatch
  beyond float tolerance the wrapper warns once and makes eager calls from then on, so a model or a PyTorch build
  that cannot be captured costs speed, never correctness;
- calls with gradients enabled, on the CPU or on any device but CUDA, are eager calls.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

#: relative tolerance of the self-check of a graph's first replay against an eager call
CHECK_RTOL = 1e-2


class GraphedUNet:
    """``unet(x, t, encoder_hidden_states=c)`` replayed from CUDA graphs (see the module docstring).

    Args:
        unet: the UNet to wrap (any module called as above whose output has ``.sample``).
        enabled: capture graphs at all (default True); False makes every call eager.
    """

    def __init__(self, unet: torch.nn.Module, enabled: bool = True) -> None:
        self.unet = unet
        self.enabled = enabled
        self.failed: str | None = None  # why graphs were given up, if they were
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None  # one memory pool shared by every graph of this wrapper
        self.replays = 0

    def __getattr__(self, name: str):  # config, parameters ... of the wrapped UNet
        unet = self.__dict__.get("unet")
        if unet is None:
            raise AttributeError(name)
        return getattr(unet, name)

    def reset(self) -> None:
        """Drop every captured graph (after parameters were replaced, not updated in place)."""
        self._graphs.clear()
        self._pool = None

    def _eager(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=c).sample

    def _usable(self, x: torch.Tensor, t: object, c: torch.Tensor) -> bool:
        return (self.enabled and self.failed is None and x.is_cuda and not torch.is_grad_enabled()
                and isinstance(t, torch.Tensor) and t.device == x.device and c.device == x.device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 **kwargs) -> SimpleNamespace:
        if kwargs or not self._usable(x, t, encoder_hidden_states):
            out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states, **kwargs)
            return SimpleNamespace(sample=out.sample)
        c = encoder_hidden_states
        amp = torch.is_autocast_enabled("cuda")
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, tuple(c.shape), c.dtype, x.device, amp,
               torch.get_autocast_dtype("cuda") if amp else None)
        try:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(x, t, c, amp)
                self._graphs[key] = entry
                checked = False
            else:
                checked = True
            graph, (sx, st, sc), out = entry
            sx.copy_(x)
            st.copy_(t)
            sc.copy_(c)
            graph.replay()
            result = out.clone()
            self.replays += 1
            if not checked:
                ref = self._eager(x, t, c)
                scale = float(ref.float().abs().max().clamp_min(1.0))
                err = float((result.float() - ref.float()).abs().max())
                if not err <= CHECK_RTOL * scale:
                    raise RuntimeError(f"graph replay differs from the eager call by {err:.3g} (scale {scale:.3g})")
            return SimpleNamespace(sample=result)
        except Exception as e:  # never fail a run for a speed-up: fall back to eager calls
            self.failed = f"{type(e).__name__}: {e}"
            self.reset()
            warnings.warn(f"CUDA graphs disabled, running eagerly ({self.failed})", RuntimeWarning, stacklevel=2)
            return SimpleNamespace(sample=self._eager(x, t, c))

    def _capture(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, amp: bool) -> tuple:
        sx, st, sc = x.clone(), t.clone(), c.clone()
        ctx = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False) if amp
               else torch.autocast("cuda", enabled=False))
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side), ctx:
            for _ in range(3):
                self._eager(sx, st, sc)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), ctx:
            out = self._eager(sx, st, sc)
        self._pool = graph.pool()
        return graph, (sx, st, sc), out


def graphed(unet: torch.nn.Module, enabled: bool = True) -> torch.nn.Module | GraphedUNet:
    """``unet`` wrapped in :class:`GraphedUNet` when ``enabled`` and it lives on a CUDA device, else ``unet``."""
    try:
        dev = next(unet.parameters()).device
    except StopIteration:
        return unet
    return GraphedUNet(unet) if enabled and dev.type == "cuda" else unet

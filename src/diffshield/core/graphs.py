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

import contextlib
import gc
import warnings
from collections.abc import Callable
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
        with torch.cuda.device(x.device):  # capture on the model's GPU, not the current one (cuda:1 models)
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


class GraphedSequence:
    """The fixed sequence of ``fn(x, t)`` calls that every iteration of an optimisation loop makes with gradients
    (TERD: one UNet call a stage-1 iteration, eleven in stage 2: ten DDIM steps and the loss), each replayed from
    CUDA graphs of its forward and its backward pass (``torch.cuda.make_graphed_callables``).

    Called like the UNet it wraps (``seq(x, t).sample``). Each iteration runs through :meth:`iteration`, which is
    given the iteration's body (draws from a CPU generator, computes the loss, calls ``backward`` and returns the
    loss) and does this:

    - the first iteration runs eagerly and records each call's input shapes; one graphed callable is then made per
      call slot, all in one memory pool, captured in the order the loop runs them (forwards in order, backwards in
      reverse), as PyTorch requires for callables that share a pool;
    - the second iteration runs twice from the same generator state: eagerly, then from the graphs; the loss and the
      gradients of ``params`` must agree within :data:`CHECK_RTOL`, else (or on any error) the wrapper warns once and
      keeps the eager results, and every later iteration is eager: a model or PyTorch build that cannot be captured
      costs speed, never correctness;
    - later iterations replay the graphs; a different number of calls than recorded, or a call whose input differs
      in shape, dtype, device or ``requires_grad`` from the recorded one, is an error (the replay would copy it into
      the recorded buffer, broadcasting or casting silently).

    A replayed call's output is the graph's own output buffer, rewritten when the same call slot is replayed in the
    next iteration: use it within the iteration (as a loss does), never keep it across iterations. The loss is
    compared relative to max(|loss|, 1) (a loss with a penalty subtracted can sit near 0), each gradient relative
    to its largest element. :meth:`release` frees the graphs once a loop is over.

    With ``enabled`` False (the caller's choice off CUDA) every call is eager and :meth:`iteration` just runs the
    body; a call off CUDA, or with a timestep that is not a tensor beside its input, gives the graphs up (the
    iteration reruns eagerly from the same draws). ``maker`` replaces ``make_graphed_callables`` (tests: any
    device).
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], enabled: bool = True,
                 maker: Callable | None = None) -> None:
        self.fn = fn
        self.enabled = enabled
        self.maker = maker
        self.failed: str | None = None  # why graphs were given up, if they were
        self.replays = 0  # iterations run from the graphs
        self._mode = "eager"
        self._samples: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._graphed: list | None = None
        self._signatures: list[tuple] = []
        self._checked = False
        self._k = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        if self._mode == "graphs":
            k, self._k = self._k, self._k + 1
            if k >= len(self._graphed):
                raise RuntimeError(f"an iteration made more than the {len(self._graphed)} calls recorded")
            if _signature(x, t) != self._signatures[k]:
                raise RuntimeError(f"call {k} of the iteration got {_signature(x, t)}; the graph was recorded for "
                                   f"{self._signatures[k]}")
            return SimpleNamespace(sample=self._graphed[k](x, t))
        if self._mode == "record":
            if not (isinstance(t, torch.Tensor) and t.device == x.device and (x.is_cuda or self.maker is not None)):
                raise _NotGraphable("a call's input is not on a CUDA device, or its timestep not a tensor beside it")
            self._samples.append((x.detach().clone().requires_grad_(x.requires_grad), t.detach().clone()))
        return SimpleNamespace(sample=self.fn(x, t))

    def release(self) -> None:
        """Free the graphs and their memory pool (the loop that used them is over); later iterations are eager."""
        self.enabled = False
        self._drop()

    def _drop(self) -> None:
        had = self._graphed is not None
        self._graphed, self._samples, self._mode = None, [], "eager"
        if had:
            gc.collect()  # the graphs live in autograd.Function classes, freed by the cycle collector only

    def status(self) -> dict:
        """``{"replays": iterations run from graphs, "failed": why graphs were given up, or None}``."""
        return {"replays": self.replays, "failed": self.failed}

    def _give_up(self, why: str) -> None:
        self.failed = why
        self._drop()
        warnings.warn(f"CUDA graphs disabled, running eagerly ({why})", RuntimeWarning, stacklevel=3)

    @staticmethod
    def _clear(params: list[torch.Tensor]) -> None:
        for p in params:
            p.grad = None

    def iteration(self, body: Callable[[], torch.Tensor], gen: torch.Generator,
                  params: list[torch.Tensor]) -> torch.Tensor:
        """Run one iteration's ``body`` (its random draws from ``gen``; it calls ``backward``) with the gradients of
        ``params`` cleared first; returns its loss, the gradients left in ``params``."""
        self._clear(params)
        if not self.enabled or self.failed is not None:
            self._mode = "eager"
            return body()
        if self._graphed is None:  # the first iteration: eager, recording the calls
            self._mode, self._samples, state = "record", [], gen.get_state()
            try:
                loss = body()
            except _NotGraphable as e:  # run the iteration again, eagerly, from the same draws
                self._give_up(str(e))
                gen.set_state(state)
                self._clear(params)
                return body()
            finally:
                self._mode = "eager"
            try:
                self._make()
            except Exception as e:  # noqa: BLE001 - any capture failure: eager from now on
                self._give_up(f"{type(e).__name__}: {e}")
            return loss
        if not self._checked:  # the second: eager and from the graphs, from the same draws
            state = gen.get_state()
            loss_e = body()
            grads_e = [None if p.grad is None else p.grad.clone() for p in params]
            after = gen.get_state()
            gen.set_state(state)
            self._clear(params)
            try:
                loss_g = self._replayed(body)
                self._compare(loss_e, loss_g, grads_e, [p.grad for p in params])
            except Exception as e:  # noqa: BLE001
                self._give_up(f"{type(e).__name__}: {e}")
                gen.set_state(after)
                for p, g in zip(params, grads_e):
                    p.grad = g
                return loss_e
            self._checked, self.replays = True, self.replays + 1
            return loss_g
        loss = self._replayed(body)
        self.replays += 1
        return loss

    def _replayed(self, body: Callable[[], torch.Tensor]) -> torch.Tensor:
        self._mode, self._k = "graphs", 0
        try:
            loss = body()
        finally:
            self._mode = "eager"
        if self._k != len(self._graphed):
            raise RuntimeError(f"an iteration made {self._k} calls; {len(self._graphed)} were recorded")
        return loss

    def _make(self) -> None:
        if not self._samples:
            raise RuntimeError("the first iteration made no call")
        maker = self.maker or torch.cuda.make_graphed_callables
        fns = tuple((lambda x, t: self.fn(x, t)) for _ in self._samples)  # one callable per call slot
        dev = self._samples[0][0].device
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():  # the model's GPU
            graphed = maker(fns, tuple(self._samples))
        self._signatures = [_signature(x, t) for x, t in self._samples]
        self._graphed, self._samples = list(graphed), []

    @staticmethod
    def _compare(loss_e: torch.Tensor, loss_g: torch.Tensor, grads_e: list, grads_g: list) -> None:
        pairs = [("loss", loss_e.detach(), loss_g.detach())]
        pairs += [(f"gradient of parameter {i}", a, b) for i, (a, b) in enumerate(zip(grads_e, grads_g))]
        for what, a, b in pairs:
            if (a is None) != (b is None):
                raise RuntimeError(f"{what} is missing in one of the eager and the replayed iteration")
            if a is None:
                continue
            scale = float(a.float().abs().max().clamp_min(1.0 if what == "loss" else 1e-12))
            err = float((a.float() - b.float()).abs().max())
            if not err <= CHECK_RTOL * scale:
                raise RuntimeError(f"the replayed iteration's {what} differs from the eager iteration's by "
                                   f"{err:.3g} (scale {scale:.3g})")


def _signature(x: torch.Tensor, t: torch.Tensor) -> tuple:
    """What a recorded call slot's graph was made for: the input's and the timestep's shape, dtype and device, and
    whether the input carries gradients."""
    return (tuple(x.shape), x.dtype, x.device, x.requires_grad, tuple(t.shape), t.dtype, t.device)


class _NotGraphable(Exception):
    """A call the graphs cannot replay (recorded in the first iteration)."""

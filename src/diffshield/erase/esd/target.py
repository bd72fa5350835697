"""One ESD iteration's pieces: x_t, the negatively guided target from the frozen UNet, and the losses.

Gandikota et al., ICCV 2023; see :mod:`diffshield.erase.esd` for the formula and the options beyond the paper.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import T2IModel
from diffshield.core.sampling import denoise, make_scheduler


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """The CPU generator of one iteration, a function of (seed, iteration) only, so that resuming is exact."""
    state = np.random.SeedSequence([int(seed), int(iteration)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state))


def sample_xt(
    model: T2IModel,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    k: int,
    noise: torch.Tensor,
    ddim_steps: int = 50,
    start_guidance: float = 3.0,
) -> torch.Tensor:
    """x_t after k DDIM steps (eta 0, classifier-free guidance ``start_guidance``) from ``noise``, without grads.

    Args:
        model: the model whose UNet samples (ESD uses the model being fine-tuned).
        cond / uncond: (B, L, d) embeddings of the concepts and (1, L, d) of the empty prompt.
        k: number of DDIM steps to run (0: x_t is the noise itself).
        noise: (B, C, h, w) standard-normal starting latents.
        ddim_steps: length N of the DDIM schedule (default 50). start_guidance: CFG scale (default 3.0).
    """
    sigma = make_scheduler(model, "ddim").init_noise_sigma
    with torch.no_grad():
        return denoise(model, noise * sigma, cond, uncond, ddim_steps, start_guidance, "ddim", stop_at=k)


def esd_target(
    frozen_unet: torch.nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    eta: float = 1.0,
    base: torch.Tensor | None = None,
    target_base: str = "uncond",
) -> torch.Tensor:
    """ε*(x_t, ∅, t) − η [ε*(x_t, c, t) − ε*(x_t, ∅, t)] from the frozen original UNet θ* (no grads).

    Args:
        frozen_unet: θ*, the original UNet. x_t: (B, C, h, w) latents. t: the timestep.
        cond / uncond: (B, L, d) embeddings of the concepts c and (1, L, d) of the empty prompt ∅.
        eta: negative-guidance scale η (default 1.0).
        base: (B, L, d) embeddings of broader prompts f (default None): the target starts from ε*(x_t, f, t)
            instead of ε*(x_t, ∅, t) (``ESDConfig.erase_from``).
        target_base: without ``base``, "uncond" (default, the paper's ε*(x_t, ∅, t)) or "concept" (ε*(x_t, c, t),
            as the official ``esd_sd.py``).
    """
    with torch.no_grad():
        uncond = uncond.expand(cond.shape[0], -1, -1)
        rows = [uncond, cond] if base is None else [uncond, cond, base]
        eps = frozen_unet(torch.cat([x_t] * len(rows)), t, encoder_hidden_states=torch.cat(rows)).sample
        e_uncond, e_cond, *e_base = eps.chunk(len(rows))
        start = e_base[0] if e_base else (e_cond if target_base == "concept" else e_uncond)
        return start - eta * (e_cond - e_uncond)


def esd_loss(
    unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """MSE(ε_θ(x_t, c, t), target), in float32; differentiable in the UNet's parameters."""
    return F.mse_loss(unet(x_t, t, encoder_hidden_states=cond).sample.float(), target.float())


def esd_anchored_loss(
    unet: torch.nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    target: torch.Tensor,
    x_p: torch.Tensor,
    cond_p: torch.Tensor,
    target_p: torch.Tensor,
    weight: float = 1.0,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    guided: tuple[float, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ESD loss plus ``weight`` · MSE(ε_θ(x_p, c_p, t), ε*(x_p, c_p, t)), in one UNet pass.

    ``shared`` (default None): (x_s, c_s, ε*(x_s, c_s, t)) of the anchors held at the concept's x_t
    (``preserve_at="own+concept"``); their MSE is added to the preservation term.
    ``guided`` (default None): (s, ∅ embeddings, one row per anchor): the anchor compares guided predictions
    ε_θ(x_p, ∅) + s [ε_θ(x_p, c_p) − ε_θ(x_p, ∅)] (``target_p`` must then be the frozen model's guided prediction).
    Returns (total loss, the preservation term alone). ``target_p`` is the frozen UNet's prediction ε*(x_p, c_p, t).
    """
    xs, cs = [x_t, x_p], [cond, cond_p]
    if shared is not None:
        xs.append(shared[0])
        cs.append(shared[1])
    if guided is not None:
        xs.append(x_p)
        cs.append(guided[1])
    eps = unet(torch.cat(xs), t, encoder_hidden_states=torch.cat(cs)).sample.float()
    parts = eps.split([x.shape[0] for x in xs])
    pred_p = parts[1] if guided is None else parts[-1] + guided[0] * (parts[1] - parts[-1])
    keep = F.mse_loss(pred_p, target_p.float())
    if shared is not None:
        keep = keep + F.mse_loss(parts[2], shared[2].float())
    return F.mse_loss(parts[0], target.float()) + weight * keep, keep


def kv_anchor_terms(
    params: dict[str, torch.nn.Parameter], emb: torch.Tensor
) -> list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor, float]]:
    """(W, C, W₀ Cᵀ, ‖W₀ Cᵀ‖²) for every trained ``attn2.to_k`` / ``attn2.to_v`` weight; C = all rows of ``emb``
    ((P, L, d) text embeddings of the preserved prompts). The constants of :func:`kv_anchor_penalty`."""
    rows = emb.detach().reshape(-1, emb.shape[-1]).float()
    out = []
    for name, w in params.items():
        if name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            ref = (w.detach().float() @ rows.T).clone()
            out.append((w, rows, ref, float((ref**2).sum()) or 1.0))
    if not out:
        raise DiffshieldError("kv_anchor_weight needs trained attn2.to_k / attn2.to_v weights (ESD-x)")
    return out


def kv_anchor_penalty(terms: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """Mean over matrices of ‖W Cᵀ − W₀ Cᵀ‖² / ‖W₀ Cᵀ‖²: how far the preserved prompts' keys and values moved."""
    return sum(((w.float() @ rows.T - ref) ** 2).sum() / norm for w, rows, ref, norm in terms) / len(terms)



"""Shared machinery of the closed-form cross-attention edits (UCE, RECE): one d x d matrix G for every K/V matrix.

UCE (Gandikota et al., WACV 2024) edits every cross-attention key/value matrix W (``attn2.to_k`` / ``attn2.to_v``,
rows = tokens, k = W c) by

    W_new = (λ W + s_e Σ_i W T_iᵀ K_i + s_p Σ_j W P_jᵀ P_j) · (λ I + s_e Σ_i K_iᵀ K_i + s_p Σ_j P_jᵀ P_j)⁻¹
          = W · G,      G = (λ I + s_e Σ_i T_iᵀ K_i + s_p Σ_j P_jᵀ P_j) · (λ I + s_e Σ_i K_iᵀ K_i + s_p Σ_j P_jᵀ P_j)⁻¹

because the targets W·T and W·P are linear in W. G depends only on the text embeddings, so an edit of all 32
matrices of SD 1.x is one d x d solve (float64) plus one matmul per matrix, instead of one solve per matrix.
RECE (Gong et al., ECCV 2024) chains such edits (W0 · G1 · G2 ...) and needs Σ_l W'_lᵀ W'_l and Σ_l W'_lᵀ W0_l for
its adversarial embedding; with W' = W0 · G both follow from S0 = Σ_l W0_lᵀ W0_l, computed once:
Σ W'ᵀW' = Gᵀ S0 G and Σ W'ᵀW0 = Gᵀ S0.

Weights are always written in place (``weight.data.copy_``); modules are never replaced, so hooks and adapters
attached to them keep working.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import T2IModel
from diffshield.erase.base import cross_attention_kv

#: K/V matrices are edited as float32 matmuls with a G solved in float64 (never in half precision).
SOLVE_DTYPE = torch.float64


# --- Finding the matrices ----------------------------------------------------------------------------------------


def kv_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The cross-attention ``to_k`` / ``to_v`` layers as (parameter name, layer), checked to share one input width.

    The parameter name is the module name plus ``.weight`` (e.g. ``mid_block.attentions.0....attn2.to_k.weight``).
    Raises DiffshieldError if the UNet has no such layer or if their input widths differ.
    """
    layers = [(f"{name}.weight", mod) for name, mod in cross_attention_kv(unet)]
    if not layers:
        raise DiffshieldError("the UNet has no cross-attention attn2.to_k/to_v layers; is it text-conditioned?")
    widths = {mod.weight.shape[1] for _, mod in layers}
    if len(widths) != 1:
        raise DiffshieldError(f"cross-attention layers read text embeddings of different widths {sorted(widths)}")
    return layers


def kv_weights(model: T2IModel | torch.nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot (detached clones) of every cross-attention K/V weight: parameter name -> (out, d) tensor.

    Args:
        model: a T2IModel or its UNet. Keep the snapshot of the original model to run RECE's adversarial
            embedding (:func:`diffshield.erase.rece.adversarial_embedding_for`) against an edited copy.
    """
    unet = model.unet if isinstance(model, T2IModel) else model
    return {name: mod.weight.detach().clone() for name, mod in kv_layers(unet)}


def kv_relative_change(w0: dict[str, torch.Tensor], w1: dict[str, torch.Tensor], rows: torch.Tensor) -> float:
    """‖(W1 − W0) Eᵀ‖ / ‖W0 Eᵀ‖ over every K/V matrix of two :func:`kv_weights` snapshots, in float64.

    Args:
        w0 / w1: K/V weights before and after an edit (same names). rows: (n, d) text-embedding rows E.
    """
    e = rows.double()
    num = sum(float(((w1[k].double() - w0[k].double()) @ e.T).norm() ** 2) for k in w0)
    den = sum(float((w0[k].double() @ e.T).norm() ** 2) for k in w0)
    return (num / den) ** 0.5


def embedding_width(unet: torch.nn.Module) -> int:
    """d, the text-embedding width that the K/V matrices read."""
    return int(kv_layers(unet)[0][1].weight.shape[1])


# --- Token rows -----------------------------------------------------------------------------------------------------


def last_word_index(model: T2IModel, prompts: Sequence[str]) -> list[int]:
    """Index of the last word token of each prompt (attention_mask.sum() - 2; 0 is BOS for an empty prompt).

    Tokenizes exactly as :func:`diffshield.core.sampling.tokenize` does (padding to ``model_max_length``).
    """
    return [int(m.sum()) - 2 for m in _padded(model, prompts).attention_mask]


def token_ids(model: T2IModel, prompts: Sequence[str]) -> list[torch.Tensor]:
    """The padded token ids of each prompt (``model_max_length`` long), tokenized as :func:`last_word_index` does."""
    return list(_padded(model, prompts).input_ids)


def _padded(model: T2IModel, prompts: Sequence[str]):
    """The tokenizer's output for ``prompts`` padded to ``model_max_length``, as the text encoder sees them."""
    tok = model.tokenizer
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt")


# --- The shared matrix G ------------------------------------------------------------------------------------------


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a · x = b for a symmetric positive definite ``a`` (Cholesky; LU if ``a`` is not positive definite)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.solve(a, b)


def shared_edit_matrix(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    preserve: Sequence[torch.Tensor],
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> torch.Tensor:
    """G (d x d, float64) such that the UCE update of every K/V matrix is W_new = W · G.

    G = (λ I + s_e Σ Tᵀ K + s_p Σ Pᵀ P) · (λ I + s_e Σ Kᵀ K + s_p Σ Pᵀ P)⁻¹, solved (not inverted) in float64.

    Args:
        pairs: (K, T) per erased concept: K (n, d) embedding rows to erase, T (n, d) the guide rows aligned with K.
        preserve: P (m, d) embedding rows whose keys/values should not change.
        lamb: λ, the pull towards the current weights (> 0).
        erase_scale: s_e. preserve_scale: s_p.
    """
    num, den = _edit_sums(pairs, preserve, lamb, erase_scale, preserve_scale)
    # G = num · den⁻¹ and den is symmetric positive definite (λ > 0), so Gᵀ = den⁻¹ · numᵀ.
    return spd_solve(den, num.T).T


def _edit_sums(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    preserve: Sequence[torch.Tensor],
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ I + s_e Σ TᵀK + s_p Σ PᵀP, λ I + s_e Σ KᵀK + s_p Σ PᵀP) in float64."""
    if not pairs:
        raise DiffshieldError("nothing to erase: give at least one concept")
    d = pairs[0][0].shape[-1]
    dev = pairs[0][0].device
    eye = torch.eye(d, dtype=SOLVE_DTYPE, device=dev)
    num = lamb * eye  # λ I + s_e Σ TᵀK + s_p Σ PᵀP
    den = lamb * eye  # λ I + s_e Σ KᵀK + s_p Σ PᵀP
    for k, t in pairs:
        k, t = k.to(dev, SOLVE_DTYPE), t.to(dev, SOLVE_DTYPE)
        if k.shape != t.shape:
            raise DiffshieldError(f"erase rows {tuple(k.shape)} and guide rows {tuple(t.shape)} are not aligned")
        num = num + erase_scale * (t.T @ k)
        den = den + erase_scale * (k.T @ k)
    for p in preserve:
        p = p.to(dev, SOLVE_DTYPE)
        pp = preserve_scale * (p.T @ p)
        num = num + pp
        den = den + pp
    return num, den


def tensor_correction(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    preserve: Sequence[torch.Tensor],
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """What the official 2023 UCE script's ``tensor`` technique adds to W · G, per erased concept: (K, T, K den⁻¹).

    The technique's target for concept i in matrix W is W Tᵢᵀ − αᵢ W Kᵢᵀ with αᵢ = ⟨W Kᵢᵀ, W Tᵢᵀ⟩ / ‖W Kᵢᵀ‖²
    (Frobenius, over the concept's rows), so W_new = W G − s_e Σᵢ αᵢ (W Kᵢᵀ)(Kᵢ den⁻¹) with den = λ I + s_e Σ KᵀK +
    s_p Σ PᵀP: αᵢ depends on W, the rest does not (:func:`apply_tensor`). All float64.
    """
    _, den = _edit_sums(pairs, preserve, lamb, erase_scale, preserve_scale)
    out = []
    for k, t in pairs:
        k, t = k.to(den.device, SOLVE_DTYPE), t.to(den.device, SOLVE_DTYPE)
        out.append((k, t, erase_scale * spd_solve(den, k.T).T))  # den symmetric: K den⁻¹ = (den⁻¹ Kᵀ)ᵀ
    return out


def apply_tensor(
    layers: Sequence[tuple[str, torch.nn.Linear]],
    g: torch.Tensor,
    correction: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> None:
    """Write the ``tensor`` technique's W_new = W G − Σᵢ αᵢ (W Kᵢᵀ)(s_e Kᵢ den⁻¹) into every layer, in place, from
    each layer's current weight (computed in float64; see :func:`tensor_correction`)."""
    with torch.no_grad():
        for _, mod in layers:
            w = mod.weight.detach().to(g.device, SOLVE_DTYPE)
            new = w @ g.to(SOLVE_DTYPE)
            for k, t, kd in correction:
                wk, wt = w @ k.T, w @ t.T
                alpha = (wk * wt).sum() / (wk * wk).sum().clamp_min(1e-300)
                new = new - alpha * (wk @ kd)
            mod.weight.data.copy_(new.to(mod.weight.device, mod.weight.dtype))


# --- Writing the edit, and the sums over all matrices --------------------------------------------------------------


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32  # never multiply in half precision


def apply_shared(
    layers: Sequence[tuple[str, torch.nn.Linear]],
    g: torch.Tensor,
    base: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write W_new = W · G into every layer, in place (``weight.data.copy_``): one matmul per matrix.

    Args:
        layers: (parameter name, linear layer) pairs from :func:`kv_layers`.
        g: the shared d x d matrix (any dtype; the matmul runs in float32, or float64 for float64 weights).
        base: the W to multiply, by parameter name (default None: each layer's current weight).
    """
    cache: dict[tuple, torch.Tensor] = {}
    with torch.no_grad():
        for name, mod in layers:
            src = mod.weight if base is None else base[name]
            key = (src.device, _work_dtype(src))
            if key not in cache:
                cache[key] = g.to(*key)
            mod.weight.data.copy_(src.to(key[1]) @ cache[key])


def gram_sum(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ_l W_lᵀ W_l (d x d, float64); each product is taken in float32 (float64 for float64 weights)."""
    total = None
    for w in weights:
        w = w.detach().to(_work_dtype(w))
        part = (w.T @ w).to(SOLVE_DTYPE)
        total = part if total is None else total + part.to(total.device)
    if total is None:
        raise DiffshieldError("no K/V weights given")
    return total


def cross_gram_sum(current: Iterable[torch.Tensor], original: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ_l W'_lᵀ W0_l (d x d, float64) over matching lists of current and original K/V weights."""
    total = None
    for w1, w0 in zip(current, original, strict=True):
        if w1.shape != w0.shape:
            raise DiffshieldError(f"current and original K/V weights differ in shape: {tuple(w1.shape)} vs "
                                  f"{tuple(w0.shape)}")
        a = w1.detach().to(_work_dtype(w1))
        part = (a.T @ w0.detach().to(a.device, a.dtype)).to(SOLVE_DTYPE)
        total = part if total is None else total + part.to(total.device)
    if total is None:
        raise DiffshieldError("no K/V weights given")
    return total


def adversarial_solve(
    gram: torch.Tensor,
    cross: torch.Tensor,
    c: torch.Tensor,
    lamb_r: float,
    variant: str = "regzero",
    c_old: torch.Tensor | None = None,
    surrogate_item: str = "1st",
) -> torch.Tensor:
    """RECE's closed-form adversarial embedding from the two d x d sums (Gong et al., ECCV 2024).

    regzero:  C' = argmin Σ ||W' c' - W0 c||² + λ_r ||c'||²          = C · (M⁻¹ N)ᵀ = (M⁻¹ N Cᵀ)ᵀ
    standard: C' = argmin Σ ||W' c' - W0 c||² + λ_r ||c' - c_old||²  = (M⁻¹ (N Cᵀ + λ_r C_oldᵀ))ᵀ
    with M = λ_r I + Σ W'ᵀW' (``gram`` is Σ W'ᵀW') and N = Σ W'ᵀW0 (``cross``). Rows of ``c`` are token embeddings;
    ``c`` may be (L, d) or (B, L, d). Returns C' with the dtype and device of ``c``.

    surrogate (the official code's ``close_surrogatereg``, ``close_form_emb`` without an old target): C' = C (M⁻¹ N)ᵀ
    with, for ``surrogate_item`` "1st" (its training scripts' default) M = (1 + λ_r) S', N = Σ W'ᵀW0 + λ_r S';
    "2nd": M = λ_r I + S', N = λ_r I + Σ W'ᵀW0; "both": M = λ_r I + (1 + λ_r) S', N = λ_r I + Σ W'ᵀW0 + λ_r S'
    (S' = Σ W'ᵀW'). "1st" needs S' invertible (a solve that fails says so).
    """
    if lamb_r < 0:
        raise DiffshieldError(f"lamb_r must be >= 0, got {lamb_r}")
    d = gram.shape[0]
    eye = torch.eye(d, dtype=SOLVE_DTYPE, device=gram.device)
    if variant == "surrogate":
        s1, n0 = gram.to(SOLVE_DTYPE), cross.to(gram.device, SOLVE_DTYPE)
        if surrogate_item == "1st":
            m, n = (1 + lamb_r) * s1, n0 + lamb_r * s1
        elif surrogate_item == "2nd":
            m, n = lamb_r * eye + s1, lamb_r * eye + n0
        elif surrogate_item == "both":
            m, n = lamb_r * eye + (1 + lamb_r) * s1, lamb_r * eye + n0 + lamb_r * s1
        else:
            raise DiffshieldError(f"surrogate_item must be '1st', '2nd' or 'both', got {surrogate_item!r}")
        rows = c.reshape(-1, d).to(m.device, SOLVE_DTYPE)
        try:
            out = torch.linalg.solve(m, n @ rows.T).T
        except RuntimeError:
            raise DiffshieldError("the surrogate's matrix (1 + λ_r) Σ W'ᵀW' is singular; use surrogate_item "
                                  "'both' or '2nd'") from None
        return out.reshape(c.shape).to(c.device, c.dtype)
    m = gram.to(SOLVE_DTYPE) + lamb_r * eye
    rows = c.reshape(-1, d).to(m.device, SOLVE_DTYPE)
    rhs = cross.to(m.device, SOLVE_DTYPE) @ rows.T  # N Cᵀ: d x rows, far fewer right-hand sides than d
    if variant == "standard":
        if c_old is None:
            raise DiffshieldError("the 'standard' variant needs c_old (the embedding of the guide used before)")
        rhs = rhs + lamb_r * c_old.to(m.device, SOLVE_DTYPE).expand(c.shape).reshape(-1, d).T
    elif variant != "regzero":
        raise DiffshieldError(f"variant must be 'regzero', 'standard' or 'surrogate', got {variant!r}")
    return spd_solve(m, rhs).T.reshape(c.shape).to(c.device, c.dtype)

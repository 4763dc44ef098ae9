"""CorDA — Context-oriented Decomposition Adaptation (Yang et al., NeurIPS 2024, arXiv 2406.05223).

A LoRA *initialisation* from the covariance of a layer's inputs on context data. For a weight in
HF layout ``W_hf [out, in]`` (ours is ``W = W_hf.T``, ``y = x @ W``) and ``C = Σ x xᵀ [in, in]``::

    C'         = C + λ · mean(diag C) · I      (λ = 0.01, doubled until ‖C' C'⁻¹ − I‖_F < 0.05)
    U Σ Vᵀ     = SVD(W_hf C')
    V̂ᵀ         = Vᵀ C'⁻¹                        (so that U Σ V̂ᵀ = W_hf)
    S          = the r largest (``mode="ipm"``, instruction-previewed: C from the task data)
                 or the r smallest (``mode="kpm"``, knowledge-preserved: C from knowledge to keep)
    B_hf       = U_S √Σ_S,   A_hf = √Σ_S V̂_Sᵀ,   W_res = W_hf − B_hf A_hf   (frozen)

In our layout the LoRA factors are ``a = A_hfᵀ [in, r]`` and ``b = B_hfᵀ [r, out]`` with scale 1
(``alpha = rank`` in :mod:`curriculax.peft.lora`), and the frozen base weight is ``W_res.T``, so the
adapted model starts exactly at the pretrained one. ``damping=None`` uses the paper's pure
formula (``C' = C``).

Done here: the decomposition (:func:`decompose`) and :func:`init_adapters` for a params tree given
per-target covariances. Not done: collecting the covariances from the model's layer inputs on
calibration data, and starting a ``lora`` training run from these adapters in the trainer.
"""

from __future__ import annotations

import numpy as np

from curriculax.sparsity import base


def default_config() -> dict:
    return dict(rank=128, mode="ipm", damping=0.01, tolerance=0.05, samples=256)


def damp(cov, damping: float | None = 0.01, tolerance: float = 0.05):
    cov = np.asarray(cov, np.float64)
    if not damping:
        return cov
    eye = np.eye(cov.shape[0])
    lam = damping
    while True:
        c = cov + lam * np.mean(np.diag(cov)) * eye
        if np.linalg.norm(c @ np.linalg.inv(c) - eye) < tolerance:
            return c
        lam *= 2


def decompose(w, cov, rank: int, mode: str = "ipm", *, damping: float | None = 0.01,
              tolerance: float = 0.05):
    """``(a [in, r], b [r, out], w_res [in, out])`` for our-layout ``w [in, out]``, with
    ``w == w_res + a @ b`` (float32 outputs)."""
    w_hf = np.asarray(w, np.float64).T
    c = damp(cov, damping, tolerance)
    u, s, vt = np.linalg.svd(w_hf @ c, full_matrices=False)
    v_hat_t = vt @ np.linalg.inv(c)
    if mode == "ipm":
        sel = np.arange(rank)
    elif mode == "kpm":
        sel = np.arange(len(s) - rank, len(s))
    else:
        raise ValueError(f"CorDA mode={mode!r}; expected 'ipm' or 'kpm'.")
    root = np.sqrt(s[sel])
    b_hf = u[:, sel] * root
    a_hf = root[:, None] * v_hat_t[sel]
    w_res = w_hf - b_hf @ a_hf
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return f32(a_hf.T), f32(b_hf.T), f32(w_res.T)


def init_adapters(params, covariances: dict, rank: int, mode: str = "ipm", **kw):
    """``(residual params, adapters)`` for the :mod:`curriculax.peft.lora` layout
    (``{path: {"a", "b"}}``, scale 1); ``covariances`` maps a target path (``layers/0/attn/q``)
    to its input covariance ``[in, in]`` (``in`` = the first dim of the 2-D view)."""
    import jax

    adapters = {}

    def one(path, p):
        name = base.path_str(path)
        if name not in covariances:
            return p
        m, n = base.matrix_view(name, p.shape)
        a, b, res = decompose(np.asarray(p).reshape(m, n), covariances[name], rank, mode, **kw)
        adapters[name] = {"a": a, "b": b}
        return res.reshape(p.shape).astype(np.asarray(p).dtype)

    residual = jax.tree_util.tree_map_with_path(one, params)
    return residual, adapters

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

Pipeline:

1. :func:`collect_covariances` runs the frozen model over calibration rows and accumulates
   ``C = X Xᵀ`` of every targeted projection's input (padding excluded; as the official code,
   each row's inputs scaled by their largest ``|x|`` and ``C`` averaged over rows), from the
   inputs the model sows while ``record_inputs`` is on (``q/k/v`` share one input, as do
   ``gate/up``).
2. :func:`prepare` does this for a config's starting model (``model.init_from`` /
   ``model.hf_path`` / random) on its training data (``ipm``: the task) or on other data passed
   as ``calibration`` records (``kpm``: the knowledge to keep), damps the covariances on the
   host and writes them to ``<workdir>/corda_covariances-<key>.npz``. It returns the ``lora``
   config whose ``init_params`` decomposes every target inside the jitted init
   (:func:`decompose_jnp`): the frozen base becomes ``W_res`` and the adapters start at
   ``(a, b)`` with scale 1 (``alpha = rank``), so training starts exactly at the pretrained model.

Defaults (``default_config``): rank 128 (paper, LLaMA-2), ``ipm``, damping 0.01 doubled until
the inverse error < 0.05 (official code), 256 calibration samples.

Usage::

    lora_cfg = corda.prepare(c, "runs/corda", rank=16)   # covariances from c's training data
    train(lora_cfg, "runs/corda")
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from curriculax.sparsity import base

# Which sown input feeds which projection (curriculax.models.layers.record).
_INPUTS = {"attn": {"qkv_input": ("q", "k", "v"), "o_input": ("o",)},
           "mlp": {"gate_up_input": ("gate", "up"), "down_input": ("down",)}}


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


def _check_rank(rank: int, shape) -> None:
    if not 0 < rank <= min(shape):
        raise ValueError(f"CorDA rank={rank} must be in [1, {min(shape)}] for a {tuple(shape)} weight "
                         f"(its smaller side): lower the rank passed to corda.prepare.")


def decompose(w, cov, rank: int, mode: str = "ipm", *, damping: float | None = 0.01,
              tolerance: float = 0.05):
    """``(a [in, r], b [r, out], w_res [in, out])`` for our-layout ``w [in, out]``, with
    ``w == w_res + a @ b`` (float32 outputs)."""
    _check_rank(rank, np.shape(w))
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


def _decompose_tree(params, covariances: dict, split):
    """``(residual params, adapters)``: ``split(w [m, n], cov) -> (a, b, w_res)`` on every
    weight whose path has a covariance; the rest pass through."""
    adapters = {}

    def one(keypath, p):
        name = base.path_str(keypath)
        if name not in covariances:
            return p
        m, n = base.matrix_view(name, p.shape)
        a, b, res = split(p.reshape(m, n), covariances[name])
        adapters[name] = {"a": a, "b": b}
        return res.reshape(p.shape).astype(p.dtype)

    return jax.tree_util.tree_map_with_path(one, params), adapters


def init_adapters(params, covariances: dict, rank: int, mode: str = "ipm", **kw):
    """``(residual params, adapters)`` for the :mod:`curriculax.peft.lora` layout
    (``{path: {"a", "b"}}``, scale 1); ``covariances`` maps a target path (``layers/0/attn/q``)
    to its input covariance ``[in, in]`` (``in`` = the first dim of the 2-D view)."""
    params = jax.tree.map(np.asarray, params)
    return _decompose_tree(params, covariances,
                           lambda w, cov: decompose(w, cov, rank, mode, **kw))


def _set_recording(model, on: bool) -> None:
    from flax import nnx

    from curriculax.models.layers import MLP, Attention

    for _, module in nnx.iter_modules(model):
        if isinstance(module, (Attention, MLP)):
            module.record_inputs = on


def collect_covariances(model, batches, pattern: str | None = None, *,
                        normalize: str = "sample") -> dict[str, np.ndarray]:
    """``{weight path: input covariance [in, in]}`` (float64) over the real tokens of ``batches``.

    ``batches`` yields ``(tokens [B,T], mask [B,T])``; ``mask`` marks the tokens whose inputs
    count (padding excluded; a row without any is not a sample). ``pattern`` (a path regex, as
    LoRA's ``targets``) limits the paths. ``normalize="sample"`` (the official code and PEFT):
    each row's inputs ``X`` are divided by their largest ``|x|`` and ``C`` is the mean over rows of
    ``Xᵀ X``; ``"none"``: the raw ``Σ_tokens x xᵀ``. The singular vectors barely move between the
    two, but ``Σ`` scales with ``C``, and with it the split of the product between ``B`` (``√Σ``)
    and ``A`` (``√Σ C⁻¹``): the normalized ``C`` keeps the official adapters' magnitudes.
    """
    if normalize not in ("sample", "none"):
        raise ValueError(f"CorDA covariance normalize={normalize!r}; expected 'sample' or 'none'.")
    from flax import nnx

    from curriculax.models.layers import LayerInput

    _set_recording(model, True)
    try:
        graphdef, state = nnx.split(model)

        @jax.jit
        def one(state, tokens, mask):
            m = nnx.merge(graphdef, state)
            _, sown = nnx.capture(m, LayerInput)(tokens)
            w = mask.astype(jnp.float32)[..., None]

            def cov(x):
                x = x.astype(jnp.float32) * w  # [B, T, in], padding zeroed
                if normalize == "sample":
                    peak = jnp.max(jnp.abs(x), axis=(1, 2), keepdims=True)
                    x = x / jnp.where(peak > 0, peak, 1.0)
                return jnp.einsum("bti,btj->ij", x, x)

            return jax.tree.map(cov, nnx.to_pure_dict(sown))

        total: dict[str, np.ndarray] = {}
        rows = 0
        for tokens, mask in batches:
            rows += int(np.asarray(mask).any(axis=1).sum())
            sums = jax.device_get(one(state, jnp.asarray(tokens), jnp.asarray(mask)))
            for i, layer in sums["layers"].items():
                for block, inputs in _INPUTS.items():
                    for key, names in inputs.items():
                        cov = np.asarray(layer[block][key][0], np.float64)
                        for name in names:
                            path = f"layers/{i}/{block}/{name}"
                            if pattern is None or re.search(pattern, path):
                                total[path] = total.get(path, 0.0) + cov
        if normalize == "sample":
            total = {k: v / max(rows, 1) for k, v in total.items()}
        return total
    finally:
        _set_recording(model, False)


def decompose_jnp(w, cov_damped, cov_inverse, rank: int, mode: str = "ipm"):
    """:func:`decompose` in jnp (inside a jitted init) with a host-damped ``C'`` and ``C'^-1``."""
    _check_rank(rank, jnp.shape(w))
    if mode not in ("ipm", "kpm"):  # anything else would silently take kpm's smallest triples
        raise ValueError(f"CorDA mode={mode!r}; expected 'ipm' or 'kpm'.")
    w_hf = jnp.asarray(w, jnp.float32).T
    u, s, vt = jnp.linalg.svd(w_hf @ cov_damped, full_matrices=False)
    v_hat_t = vt @ cov_inverse
    sel = slice(0, rank) if mode == "ipm" else slice(s.shape[0] - rank, s.shape[0])
    root = jnp.sqrt(s[sel])
    b_hf = u[:, sel] * root
    a_hf = root[:, None] * v_hat_t[sel]
    return a_hf.T, b_hf.T, (w_hf - b_hf @ a_hf).T


def save_covariances(path, covariances: dict, *, damping=0.01, tolerance: float = 0.05) -> None:
    """Damped covariances and their inverses (float32), keyed by weight path, as one ``.npz``."""
    arrays = {}
    for name, cov in covariances.items():
        c = damp(cov, damping, tolerance)
        arrays[f"{name}|c"] = c.astype(np.float32)
        arrays[f"{name}|inv"] = np.linalg.inv(c).astype(np.float32)
    np.savez(path, **arrays)


def load_covariances(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with np.load(path) as z:
        names = sorted({k.split("|")[0] for k in z.files})
        return {n: (z[f"{n}|c"], z[f"{n}|inv"]) for n in names}


def init_from_file(params, path, rank: int, mode: str, paths=None):
    """``(residual params, adapters)`` from saved covariances, traceable inside ``jax.jit``;
    ``paths`` (default: every path in the file) limits the weights that are decomposed."""
    covariances = load_covariances(path)
    if paths is not None:
        covariances = {k: v for k, v in covariances.items() if k in paths}
    return _decompose_tree(params, covariances,
                           lambda w, c: decompose_jnp(w, c[0], c[1], rank, mode))


def _calibration_key(cfg, calibration, samples: int, targets: str) -> str:
    """A short hash of everything the covariances depend on (a file for other calibration data,
    e.g. ``kpm``'s knowledge rows after an ``ipm`` run, must not be reused)."""
    import hashlib
    import json

    spec = {"model": cfg.model.to_dict(), "samples": samples, "targets": targets,
            "data": cfg.data.to_dict() if calibration is None else {
                k: cfg.data[k] for k in ("seq_len", "template")},
            "seed": cfg.seed if calibration is None else None,
            "calibration": None if calibration is None else list(calibration)}
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def prepare(cfg, workdir, *, rank: int | None = None, mode: str | None = None,
            targets: str | None = None, calibration: Sequence[dict] | None = None,
            samples: int | None = None, batch_size: int = 16):
    """Collects covariances for ``cfg``'s starting model and returns the CorDA ``lora`` config.

    The calibration rows are ``calibration`` records (e.g. knowledge questions for ``kpm``)
    or the first ``samples`` training rows; their prompt and response tokens count. The file
    (``<workdir>/corda_covariances-<key>.npz``) is named by a hash of what the covariances
    depend on (the starting model, the data config or ``calibration``, ``samples``,
    ``targets``): a rerun with the same inputs reuses it, other inputs get their own file.
    """
    import pathlib

    from flax import nnx

    from curriculax import sparsity as sparsity_lib
    from curriculax.data.bank import ExampleBank
    from curriculax.peft import lora
    from curriculax.train import setup

    d = default_config()
    rank, mode = rank or d["rank"], mode or d["mode"]
    targets = targets or lora.default_config()["targets"]
    samples = samples or d["samples"]
    if mode not in ("ipm", "kpm"):
        raise ValueError(f"CorDA mode={mode!r}; expected 'ipm' or 'kpm'.")
    root = pathlib.Path(workdir)
    path = root / f"corda_covariances-{_calibration_key(cfg, calibration, samples, targets)}.npz"
    if not path.exists():
        exp = setup.build(cfg)
        model = nnx.merge(exp.graphdef, exp.model_params(exp.init_state().params))
        data = exp.train_data if calibration is None else ExampleBank.build(
            list(calibration), exp.tokenizer, cfg.data.seq_len, template=cfg.data.template)
        if data is None:  # streaming pools (data.pool_size > 0) keep no resident bank
            from curriculax.data.sources import load_records

            data = ExampleBank.build(load_records(cfg.data, cfg.seed)[0], exp.tokenizer,
                                     cfg.data.seq_len, template=cfg.data.template,
                                     overflow=cfg.data.overflow)
        bank = data.bank
        n = min(samples, len(data))
        # input positions: the prompt's, then those whose next token is the response's
        real = (np.arange(bank.tokens.shape[1])[None, :] < bank.prompt_len[:, None]) | \
            np.asarray(bank.loss_mask, bool)
        batches = [(bank.tokens[np.minimum(np.arange(lo, lo + batch_size), n - 1)],
                    real[np.minimum(np.arange(lo, lo + batch_size), n - 1)]
                    & (np.arange(lo, lo + batch_size) < n)[:, None])
                   for lo in range(0, n, batch_size)]  # fixed shapes: one compilation
        covs = collect_covariances(model, batches, targets)
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{path.stem}.tmp.npz"
        save_covariances(tmp, covs, damping=d["damping"], tolerance=d["tolerance"])
        tmp.replace(path)
    out = cfg.copy_and_resolve_references()
    out.sparsity = sparsity_lib.config("lora", rank=rank, alpha=float(rank), targets=targets,
                                       corda=str(path), corda_mode=mode)
    return out

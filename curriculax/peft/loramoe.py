"""LoRAMoE — a router over LoRA experts with a localized balancing constraint.

Dou et al., "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via MoE-Style
Plugin" (ACL 2024, arXiv 2312.09979); official code ``Ablustrund/LoRAMoE`` (a patched
``peft/tuners/lora.py``), the authority where paper and code differ.

The base model is frozen. Each targeted FFN projection ``W0`` (``gate``, ``up``, ``down``) gets
N LoRA experts ``(A_i, B_i)`` and a router ``W_r`` (no bias); per token ``x`` (dense routing,
no top-k)::

    omega(x) = softmax(W_r x)                          # over the N experts, float32
    h        = W0 x + (alpha / r) * sum_i omega_i(x) * B_i A_i x

``A_i`` and ``W_r`` start kaiming-uniform(a=sqrt(5)) (``U(±1/sqrt(d_in))``), ``B_i = 0``: the
model starts exactly equal to the frozen one. The router depends on the token, so the experts
cannot be merged into the weights: they are modules of the model itself
(``ModelConfig.loramoe_*``, parameters ``layers/<i>/mlp/loramoe/<target>/{a,b,router}`` with
``a = A^T [N, d_in, r]``, ``b = B^T [N, r, d_out]``, ``router = W_r^T [d_in, N]``), and
:func:`curriculax.models.hf.save_hf` refuses to export such a model.

Localized balancing constraint (LBC), per adapted projection, for a batch whose examples have a
binary type ``t_m``: importance ``I[m, n] = sum_s omega_n(x_{m,s})`` over every position (padding
included, as in the code); ``Q[m, n] = 1 + delta`` when expert ``n`` is in the half matching
``t_m`` (type 1: experts ``0..N/2-1``; type 0: ``N/2..N-1``), else ``1 - delta``; ``Z = I * Q``
flattened; ``L = beta * Var_ddof1(Z) / (Mean(Z)^2 + 1e-10)`` (``lbc_form="code"``; the paper
writes ``Var(Z) / Mean(Z)``: ``lbc_form="paper"``). Every adapted projection of every block
sows its own loss and the train step adds their **sum** to the task loss. Direction as in code:
the minimum (``Z`` uniform) gives the matched half the *smaller* importance ``c/(1+delta)``.

Example types come from the batch's ``category`` index: type 1 for the categories listed in
``type1_categories`` (indices into the bank's sorted category names), or, when the list is empty,
for odd category indices. The loss is computed over the global batch (one jitted step; the code
computes it per device batch), once per gradient-accumulation micro-batch (averaged), and only in
the trained forward pass (the step passes ``category``; evaluation and decoding do not).

Defaults (``run_loramoe.sh``): ``experts=8, rank=4, alpha=32`` (scale 8), ``lbc_weight`` (beta)
``= lbc_delta = 0`` (the script disables the LBC; the paper reports 0.1 / 0.1, unverified), lr
2e-4 cosine with 3% warmup and no weight decay (set those in ``config.optimizer``). Not
implemented: the code's LoRA dropout 0.05 on the experts' input (the model's forward pass has no
dropout rng path).

Usage::

    from curriculax import sparsity
    c.sparsity = sparsity.config("loramoe", experts=8, rank=4, alpha=32.0,
                                 lbc_weight=0.1, lbc_delta=0.1)
    train(c, "runs/loramoe")

``"loramoe"`` sets the model fields above and trains only the LoRAMoE parameters (everything
else frozen bitwise, no optimizer state). The model-level pieces live in
:mod:`curriculax.models.layers` and are re-exported here.
"""

from __future__ import annotations

import jax.numpy as jnp

from curriculax.models.layers import (balance_loss, example_type, kaiming_uniform, loramoe_delta,
                                      router_weights)
from curriculax.sparsity import base, select

__all__ = ["balance_loss", "build", "default_config", "example_type", "forward", "init_leaf",
           "loramoe_delta", "model_overrides", "router_weights", "TRAINABLE"]

TRAINABLE = r"/mlp/loramoe/"  # path regex of the LoRAMoE parameters


def default_config() -> dict:
    return dict(experts=8, rank=4, alpha=32.0, targets=("gate", "up", "down"), lbc_weight=0.0,
                lbc_delta=0.0, lbc_form="code", type1_categories=())


def model_overrides(cfg) -> dict:
    """The ``ModelConfig`` fields of the method's settings."""
    return dict(loramoe_experts=int(cfg.experts), loramoe_rank=int(cfg.rank),
                loramoe_alpha=float(cfg.alpha), loramoe_targets=tuple(cfg.targets),
                loramoe_lbc_weight=float(cfg.lbc_weight), loramoe_lbc_delta=float(cfg.lbc_delta),
                loramoe_lbc_form=str(cfg.lbc_form),
                loramoe_type1_categories=tuple(int(c) for c in cfg.type1_categories))


def forward(x, w0, a, b, router, *, alpha: float, rank: int, bias=None):
    """One adapted projection, ``x @ w0 (+ bias) + (alpha/rank) sum_i omega_i B_i A_i x``, in our
    ``[in, out]`` layout (``a [N, in, r]``, ``b [N, r, out]``, ``router [in, N]``)."""
    y = x @ w0 + (0.0 if bias is None else bias)
    return y + loramoe_delta(x, a, b, router_weights(x, router), alpha / rank)


def init_leaf(path: str, shape, dtype, key):
    """The model's initialisation of one LoRAMoE parameter, by name."""
    name = path.rsplit("/", 1)[-1]
    if name == "b":
        return jnp.zeros(shape, dtype)
    return kaiming_uniform({"a": 1, "router": 0}[name])(key, shape, dtype)


def build(config, abstract_params) -> base.Sparsity:
    sparsity = select.selection(config, abstract_params, TRAINABLE,
                                what="LoRAMoE parameters (ModelConfig.loramoe_experts > 0)")

    def init_params(params, rng):
        # Weights loaded from a checkpoint without experts (Hugging Face) get them here.
        return select.fill_missing(params, abstract_params, init_leaf, rng)

    return sparsity._replace(init_params=init_params)


base.register("loramoe", build, default_config, model_overrides)

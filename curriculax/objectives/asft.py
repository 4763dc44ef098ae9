"""Anchored SFT (ASFT): DFT plus a KL anchor to the frozen starting model.

Paper: Zhu et al., "Anchored Supervised Fine-Tuning", 2025 (arXiv 2509.23753); code
``zhuchichi56/ASFT`` (``train.py``, mode ``"asft"``).

Formula (per response token ``t``; ``pi_ref`` = the frozen *initial* model on the same input)::

    l_t = -sg(p_t) * log pi_theta(y_t | ctx)  +  lambda * KL(pi_ref || pi_theta)_t
    KL(pi_ref || pi_theta)_t = sum_v pi_ref(v) (log pi_ref(v) - log pi_theta(v))

The KL is the *forward* KL over the full vocabulary (the code's
``F.kl_div(log_softmax(theta), softmax(ref)).sum(-1)``); its logit gradient is
``softmax(z) - pi_ref``. It is computed by the fused LM-head kernel
(``kl_direction="ref_policy"``) at response positions only, with no gradient to the reference.
At initialization (theta == ref) ASFT equals DFT exactly.

Defaults (``default_config``): ``kl_weight=0.05`` (README / reproductions; the code's signature
default is 0.1 -- the paper's own value is unverified), ``kl_direction="ref_policy"``,
``base="dft"`` (``"sft"`` gives the code's ``sft+kl`` baseline). Token-mean normalization.
The train step keeps ``TrainState.ref_params`` (a copy of the initial weights) because this
objective declares ``needs=("ref",)``.

Usage::

    c.objective = asft.default_config()        # c.objective.kl_weight = 0.1 to change lambda
"""

from __future__ import annotations

import ml_collections

from curriculax.objectives.base import Objective, register
from curriculax.objectives.dft import dft_token_loss

BASES = ("dft", "sft")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="asft", normalization="token", impl="auto",
                                          kl_weight=0.05, kl_direction="ref_policy", base="dft"))


def asft_token_loss(target_logprob, kl_to_ref, kl_weight: float = 0.05, base: str = "dft"):
    if base not in BASES:
        raise ValueError(f"objective.base={base!r}: choose one of {BASES}.")
    fit = dft_token_loss(target_logprob) if base == "dft" else -target_logprob
    return fit + kl_weight * kl_to_ref


def token_loss(stats, batch, config):
    del batch
    if stats.kl_to_ref is None:
        raise ValueError("asft needs stats.kl_to_ref: run it through the train step (needs=('ref',)) "
                         "or pass ref_weight to the LM-head kernel.")
    return asft_token_loss(stats.target_logprob, stats.kl_to_ref,
                           float(config.get("kl_weight", 0.05)), config.get("base", "dft"))


def kernel_options(config) -> dict:
    return {"kl_direction": config.get("kl_direction", "ref_policy")}


asft = register("asft", Objective(token_loss, needs=("ref",), kernel_options=kernel_options))

"""Supervised fine-tuning: the negative log-likelihood of each target token.

``token_loss = -log p(y_t | y_<t, x)``.
"""

from curriculax.objectives.base import Objective, register


def token_loss(stats, batch, config):
    del batch, config
    return -stats.target_logprob


sft = register("sft", Objective(token_loss))

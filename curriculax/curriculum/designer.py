"""Curriculum designer: order categories so that consecutive stages are similar, then emit a
staged ``ordering`` config.

Host-side utility, run once before training (it is not a registered curriculum):

1. :func:`category_embeddings` -- mean final hidden state of each category's rows under the
   model (over response tokens by default), plus each category's mean token loss.
2. :func:`similarity` -- cosine similarity between category embeddings ``[K, K]``.
3. :func:`rank_orderings` -- score every ordering ``pi`` by the mean similarity of consecutive
   categories ``mean_i sim[pi_i, pi_{i+1}]`` (smooth transfer from one stage to the next);
   exhaustive for ``K <= 8``, else greedy nearest-neighbour paths from every start. A path and its
   reverse score the same; the tie goes to the one whose categories get harder (higher model
   loss) along the way (easy first).
4. :func:`staged_config` -- the best ordering as ``ordering``'s ``kind="staged"`` config: stage
   ``i`` covers ``[(i)/K, (i+1)/K)`` of training and admits categories ``pi_0..pi_i``
   (``cumulative=True``, so earlier skills are rehearsed) or only ``pi_i``.

:func:`design` runs all four. The similarity-path criterion is a design choice (curriculum
design by inter-task similarity / transfer); it is documented as such, not taken from one paper.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from curriculax import objectives


def _bank_arrays(bank):
    b = getattr(bank, "bank", bank)  # ExampleBank or Bank
    names = b.info.category_names
    return (np.asarray(b.tokens), np.asarray(b.targets), np.asarray(b.loss_mask),
            np.asarray(b.category), int(b.info.pad_id), names)


def category_embeddings(model, bank, *, max_per_category: int = 64, batch_size: int = 32,
                        span: str = "response", seed: int = 0):
    """``(embeddings [K, d], mean loss [K], rows used [K])`` from at most ``max_per_category``
    random rows per category. ``span``: ``response`` (loss-mask tokens) or ``all`` (non-pad)."""
    tokens, targets, loss_mask, category, pad_id, names = _bank_arrays(bank)
    k = len(names)
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.permutation(np.flatnonzero(category == c))[:max_per_category]
                           for c in range(k)]).astype(np.int64)

    @jax.jit
    def forward(tok, tgt, mask, span_mask):
        hidden = model(tok)
        w = span_mask.astype(jnp.float32)
        emb = jnp.sum(hidden * w[..., None], 1) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
        weight, layout = model.head_weight()
        stats = objectives.lm_head_stats(hidden, weight, tgt, mask, weight_layout=layout)
        m = mask.astype(jnp.float32)
        loss = jnp.sum(-stats.target_logprob * m, 1) / jnp.maximum(m.sum(1), 1.0)
        return emb, loss

    embs, losses = [], []
    for lo in range(0, len(rows), batch_size):
        r = rows[lo: lo + batch_size]
        pad = batch_size - len(r)
        rr = np.concatenate([r, np.repeat(r[:1], pad)]) if pad else r
        span_mask = loss_mask[rr] if span == "response" else tokens[rr] != pad_id
        e, l_ = forward(tokens[rr], targets[rr], loss_mask[rr], span_mask)
        embs.append(np.asarray(e)[: len(r)])
        losses.append(np.asarray(l_)[: len(r)])
    embs, losses = np.concatenate(embs), np.concatenate(losses)
    cats = category[rows]
    d = embs.shape[1]
    out, loss, count = np.zeros((k, d), np.float32), np.zeros(k, np.float32), np.zeros(k, np.int64)
    for c in range(k):
        sel = cats == c
        count[c] = sel.sum()
        if count[c]:
            out[c], loss[c] = embs[sel].mean(0), losses[sel].mean()
    return out, loss, count


def similarity(embeddings) -> np.ndarray:
    """Cosine similarity ``[K, K]`` of category embeddings."""
    e = np.asarray(embeddings, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return (e @ e.T).astype(np.float32)


def path_score(sim, order) -> float:
    """Mean similarity of consecutive categories of ``order``."""
    if len(order) < 2:
        return 0.0
    return float(np.mean([sim[a, b] for a, b in zip(order[:-1], order[1:])]))


def _easy_first(order, difficulty) -> float:
    """Higher when difficulty rises along ``order`` (sum of position-weighted difficulty)."""
    if difficulty is None:
        return 0.0
    d = np.asarray(difficulty, np.float64)
    return float(np.sum(np.arange(len(order)) * d[list(order)]))


def rank_orderings(sim, *, difficulty=None, top: int | None = None, exhaustive_max: int = 8):
    """``[(score, order), ...]`` best first (see the module docstring)."""
    sim = np.asarray(sim)
    k = sim.shape[0]
    if k <= exhaustive_max:
        candidates = itertools.permutations(range(k))
    else:
        candidates = []
        for s in range(k):
            order, left = [s], set(range(k)) - {s}
            while left:
                nxt = max(left, key=lambda j: (sim[order[-1], j], -j))
                order.append(nxt)
                left.remove(nxt)
            candidates += [tuple(order), tuple(reversed(order))]
    ranked = sorted({tuple(o) for o in candidates},
                    key=lambda o: (-round(path_score(sim, o), 9), -_easy_first(o, difficulty), o))
    ranked = [(path_score(sim, o), o) for o in ranked]
    return ranked[:top] if top else ranked


def staged_config(order, category_names, *, cumulative: bool = True,
                  total_steps: int = 0) -> ml_collections.ConfigDict:
    """An ``ordering`` config with ``kind="staged"`` visiting categories in ``order``."""
    k = len(order)
    stages = []
    for i in range(k):
        cats = order[: i + 1] if cumulative else order[i: i + 1]
        stages.append({"end": (i + 1) / k, "categories": tuple(category_names[c] for c in cats)})
    c = ml_collections.ConfigDict()
    c.name = "ordering"
    c.kind = "staged"
    c.stages = tuple(stages)
    c.total_steps = total_steps
    return c


def design(model, bank, *, cumulative: bool = True, max_per_category: int = 64,
           total_steps: int = 0):
    """``(staged ordering config, ranking, similarity)`` for ``model`` on ``bank``."""
    emb, loss, count = category_embeddings(model, bank, max_per_category=max_per_category)
    sim = similarity(emb)
    # Categories without rows (zero embedding, loss 0: "easiest") would get stages that admit
    # no row of the bank; order only the others (orders keep the bank's category indices).
    keep = np.flatnonzero(count > 0)
    ranking = [(score, tuple(int(keep[i]) for i in order)) for score, order in
               rank_orderings(sim[np.ix_(keep, keep)], difficulty=loss[keep])]
    names = _bank_arrays(bank)[-1]
    return staged_config(ranking[0][1], names, cumulative=cumulative,
                         total_steps=total_steps), ranking, sim

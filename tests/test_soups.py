"""Model soups: exact uniform averages, the greedy rule, soups of Orbax checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curriculax import soups
from curriculax.train import build, checkpoint
from curriculax.train import train as train_loop

from test_train import tiny_config


def test_uniform_soup_worked_example_is_exact():
    t = [{"w": jnp.array([1.0, 2.0]), "b": {"x": jnp.array(3.0)}},
         {"w": jnp.array([3.0, 0.0]), "b": {"x": jnp.array(5.0)}},
         {"w": jnp.array([-1.0, 4.0]), "b": {"x": jnp.array(-2.0)}}]
    out = soups.uniform(t)
    np.testing.assert_array_equal(out["w"], [1.0, 2.0])
    np.testing.assert_array_equal(out["b"]["x"], 2.0)
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(4)]
    np.testing.assert_array_equal(soups.uniform(xs), ((xs[0] + xs[1] + xs[2] + xs[3]) / 4))


def test_greedy_soup_worked_example():
    t = [jnp.array([1.0, 2.0]), jnp.array([3.0, 0.0]), jnp.array([-1.0, 4.0])]
    score = lambda p: -float(jnp.sum((p - jnp.array([2.0, 1.0])) ** 2))  # noqa: E731
    soup, chosen, best = soups.greedy(t, score)
    np.testing.assert_array_equal(soup, [2.0, 1.0])
    assert chosen == [0, 1] and best == 0.0
    # a tie joins the soup (>=, the paper's algorithm box): every soup scores the same here
    assert soups.greedy(t, lambda p: 0.0)[1] == [0, 1, 2]


@pytest.mark.slow
def test_soup_of_checkpoints(tmp_path):
    kw = {"steps": 2, "eval_every": 2, "checkpoint_every": 2}
    dirs = []
    for seed in (0, 1):
        train_loop(tiny_config(seed=seed, **kw), tmp_path / str(seed))
        dirs.append(tmp_path / str(seed))
    cfg = tiny_config(**kw)
    soup, info = soups.from_checkpoints(cfg, dirs)
    exp = build(cfg)
    states = []
    for d in dirs:
        mngr = checkpoint.manager(d, async_save=False)
        states.append(jax.device_get(checkpoint.restore(mngr, exp.abstract_state,
                                                        exp.state_shardings)[0].params))
    want = jax.tree.map(lambda a, b: ((a.astype(np.float32) + b) / 2).astype(a.dtype), *states)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(soup), want)
    greedy, ginfo = soups.from_checkpoints(cfg, dirs, method="greedy")
    assert ginfo["chosen"][0] == int(np.argmax(ginfo["scores"]))
    assert ginfo["soup_score"] >= max(ginfo["scores"])


def test_a_mistyped_workdir_is_named_and_not_created(tmp_path):
    """The soup's reader used a manager that creates checkpoints/ at any path it is given."""
    with pytest.raises(FileNotFoundError, match="typo/checkpoints: train first"):
        soups.from_checkpoints(tiny_config(), [tmp_path / "typo"])
    assert not (tmp_path / "typo").exists()

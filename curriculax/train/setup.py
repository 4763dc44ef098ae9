"""Builds an experiment from config: mesh, data, model, optimizer, curriculum and sharded state.

State is built the nanodo way: ``jax.eval_shape`` gives the abstract state, shardings come from
the parameters' logical axes, and ``jax.jit(init, out_shardings=...)`` materializes every
buffer directly where it belongs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from curriculax import curriculum as curricula
from curriculax import objectives, sharding
from curriculax import sparsity as sparsity_lib
from curriculax.data.bank import Bank, ExampleBank
from curriculax.data.pipeline import pool_at, pool_dataset, stacked_pools
from curriculax.data.sources import load_records
from curriculax.data.tokenizer import load_tokenizer
from curriculax.models import ModelConfig, Transformer
from curriculax.train import config as config_lib
from curriculax.train import checkpoint, distributed, trainers
from curriculax.train.optim import schedule
from curriculax.train.state import TrainState
from curriculax.train.step import jit_steps


@dataclasses.dataclass
class Experiment:
    config: Any
    mesh: jax.sharding.Mesh
    rules: tuple
    tokenizer: Any
    train_data: ExampleBank | None  # None when streaming pools
    eval_data: ExampleBank
    bank: Bank  # on device, sharded along examples (the first pool when streaming)
    model_config: ModelConfig
    graphdef: Any
    optimizer: optax.GradientTransformation
    lr_schedule: optax.Schedule
    curriculum: curricula.Curriculum
    objective: objectives.Objective
    abstract_state: TrainState
    state_shardings: TrainState
    bank_shardings: Bank
    pools: Any = None  # grain.MapDataset of pools (data.pool_size > 0)
    stream_shardings: Bank | None = None
    # () -> the starting weights (config.model.hf_path / init_from), read at every init_state and
    # placed in their shardings; nothing of them stays on the devices after it
    load_init_params: Callable[[], Any] | None = None
    sparsity: sparsity_lib.Sparsity | None = None  # parameter selection (config.sparsity)
    # The bank's BankMeta from the host bank (every process holds all of it), on this process's
    # default device: what curriculum.init reads. Concrete, so init may validate it with numpy,
    # and embeddable in a jit, which a multi-process run's global bank is not (it spans other
    # processes' devices).
    host_meta: Any = None

    def data_for(self, step: int, count: int):
        """What the jitted k-step function consumes for steps ``step .. step+count-1``."""
        if self.pools is None:
            return self.bank
        return distributed.global_tree(stacked_pools(self.pools, self.bank.info, step, count),
                                       self.stream_shardings)

    def step_fn(self, count: int):
        """The jitted ``count``-step function for this experiment's data path."""
        if self.pools is None:
            return jit_steps(self.train_step(), count, self.state_shardings, self.bank_shardings)
        return jit_steps(self.train_step(), count, self.state_shardings, self.stream_shardings,
                         streaming=True)

    def init_state(self) -> TrainState:
        """A fresh state, created directly in its sharded layout."""
        cfg = self.config
        init_params = None if self.load_init_params is None else self.load_init_params()

        meta = self.host_meta

        def init(rng, params_in):
            params = params_in if params_in is not None else _random_params(
                self.model_config, rng)
            if self.sparsity is not None and self.sparsity.init_params is not None:
                params = self.sparsity.init_params(params, jax.random.fold_in(rng, 3))
            missing = sorted(set(_paths(self.abstract_state.params)) - set(_paths(params)))
            if missing:  # leaves the starting checkpoint lacks and no init_params created
                raise ValueError(f"The starting weights (config.model.init_from) lack "
                                 f"{missing[:3]}{'...' if len(missing) > 3 else ''}.")
            masks = None if self.sparsity is None else self.sparsity.init_masks(
                params, jax.random.fold_in(rng, 2))
            return TrainState(
                step=jnp.zeros((), jnp.int32), rng=jax.random.fold_in(rng, 1), params=params,
                opt_state=self.optimizer.init(params),
                curriculum=self.curriculum.init(cfg.curriculum, meta),
                ref_params=params if _needs_ref(self) else None, masks=masks,
                rl=self.trainer.init_extra(cfg),
            )

        rng = jax.random.PRNGKey(cfg.seed)
        # donated: loaded weights are not held twice (once as loaded, once in the state)
        return jax.jit(init, out_shardings=self.state_shardings, donate_argnums=1)(rng, init_params)

    def model_params(self, params):
        """The model's plain weights from the trained ``params`` (merges LoRA adapters)."""
        if self.sparsity is None or self.sparsity.materialize is None:
            return params
        return self.sparsity.materialize(params)

    def forward_params(self, params):
        """What the train step's model runs on (LoRA adapters applied unmerged)."""
        return sparsity_lib.forward_fn(self.sparsity)(params)

    @property
    def trainer(self) -> trainers.Trainer:
        return trainers.get(self.config.trainer)

    def train_step(self):
        """The pure ``step(state, data) -> (state, metrics)`` of ``config.trainer``, tracing the
        model with its activations sharded along ``batch`` (:func:`sharding.activation_sharding`)."""
        return sharding.with_activation_sharding(self.trainer.make_step(self), self.mesh,
                                                 self.rules)


def _random_params(model_config: ModelConfig, rng):
    model = Transformer(model_config, rngs=nnx.Rngs(params=rng))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _rules(cfg) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.sharding_rules)


def _with_updates_per_step(cfg, k: int):
    """A copy of ``cfg`` whose ``optimizer.updates_per_step`` is ``k`` (read by ``optim.schedule``)."""
    if k == 1:
        return cfg
    cfg = copy.deepcopy(cfg)
    with cfg.unlocked():
        cfg.optimizer.updates_per_step = k
    return cfg


def build(cfg) -> Experiment:
    config_lib.validate(cfg)
    trainers.get(cfg.trainer).check(cfg)
    cfg = curricula.with_total_steps(cfg)  # curriculum.total_steps 0/absent -> cfg.steps
    cfg = _with_updates_per_step(cfg, trainers.get(cfg.trainer).updates_per_step(cfg))
    m = cfg.mesh
    if jax.process_count() > 1 and m.num_devices not in (0, jax.device_count()):
        raise ValueError(f"config.mesh.num_devices={m.num_devices}: a multi-process run uses "
                         f"every device of every process; set it to 0 ({jax.device_count()} "
                         f"devices).")
    devices = jax.devices()[: m.num_devices] if m.num_devices else None
    mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=devices,
                              dcn_data=m.get("dcn_data", 1), dcn_fsdp=m.get("dcn_fsdp", 1))
    logging.getLogger(__name__).info("%s", distributed.describe_mesh(mesh))
    rules = _rules(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_records, eval_records = load_records(cfg.data, cfg.seed)
    d = cfg.data
    build_kw = dict(seq_len=d.seq_len, template=d.template)
    train_data = pools = None
    if d.pool_size:  # streaming: tokenized lazily, one pool per step
        pools, info = pool_dataset(train_records, tokenizer, pool_size=d.pool_size, seed=cfg.seed,
                                   overflow=d.overflow, **build_kw)
        host_bank = pool_at(pools, info, 0)
    else:
        train_data = ExampleBank.build(train_records, tokenizer, overflow=d.overflow, **build_kw)
        host_bank = train_data.bank
        make_bank = trainers.get(cfg.trainer).make_bank
        if make_bank is not None:  # e.g. DPO's (chosen, rejected) pairs
            host_bank, train_data = make_bank(train_data, tokenizer, cfg)
    # evaluation decodes from the prompts: a long gold solution is no reason to drop a problem
    # (data.overflow="drop" would bias the held-out set towards short answers)
    eval_data = ExampleBank.build(eval_records, tokenizer, overflow="truncate", **build_kw,
                                  category_names=_merged_categories(
                                      eval_records, host_bank.meta().category_names))

    if cfg.model.hf_path:
        from curriculax.models import hf

        if cfg.model.get("init_from"):
            raise ValueError("config.model.init_from and config.model.hf_path are both set: "
                             "choose one starting point.")
        # the architecture from its config.json; the dtypes from config.model (float32 stored
        # weights by default: AdamW updates of ~lr are far below a bfloat16 weight's rounding)
        model_config = hf.read_config(cfg.model.hf_path, dtype=cfg.model.dtype,
                                      param_dtype=cfg.model.param_dtype)
        hf.check_hf(cfg.model.hf_path, model_config)  # a mismatched checkpoint fails here
        hf_config = model_config  # without the adapters model_overrides may add below
    else:
        model_config = config_lib.model_config(cfg)
    # Methods that add modules to the model (LoRAMoE, prefix tuning) switch them on here.
    model_config = model_config.replace(**sparsity_lib.base.model_overrides(cfg))
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens: raise it or use a matching tokenizer."
        )
    abstract_model = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
    graphdef, abstract_params_state = nnx.split(abstract_model, nnx.Param)
    param_axes = sharding.logical_axes(abstract_params_state)

    num_rows = jax.tree.leaves(host_bank)[0].shape[0]
    example_sharding = sharding.named_sharding(mesh, (num_rows,), ("examples",), rules)
    rows_spec = example_sharding.spec[0]
    wanted = sharding.logical_to_mesh(("examples",), rules)[0]
    if wanted is not None and example_sharding.spec != P(wanted):
        names = (wanted,) if isinstance(wanted, str) else tuple(wanted)
        shards = math.prod(mesh.shape[n] for n in names)
        logging.getLogger(__name__).warning("The %d-row %s does not split evenly over the %d %s shards: it (and the "
                    "curriculum's per-example state) is laid out as %s instead. A multiple of %d "
                    "rows (data.num_train / data.pool_size) shards it evenly.", num_rows,
                    "pool" if pools is not None else "example bank", shards, names,
                    example_sharding.spec, shards)
    bank_shardings = jax.tree.map(
        lambda x: NamedSharding(mesh, P(rows_spec, *([None] * (x.ndim - 1)))), host_bank)
    # Every process holds the whole host bank; each copies only its devices' rows.
    distributed.check_same_everywhere(host_bank, "The training data (host bank)")
    bank = distributed.global_tree(host_bank, bank_shardings)
    # Streaming feeds k pools per dispatch, stacked on a leading (unsharded) axis.
    stream_shardings = None if pools is None else jax.tree.map(
        lambda x: NamedSharding(mesh, P(None, rows_spec, *([None] * (x.ndim - 1)))), host_bank)

    sparsity = sparsity_lib.build(cfg, nnx.to_pure_dict(abstract_params_state))
    optimizer = sparsity.optimizer  # make_optimizer's clip + AdamW, restricted by the masks
    lr_schedule = schedule(cfg.optimizer, cfg.steps)
    curriculum = curricula.get(cfg.curriculum.name)
    if pools is not None and not curriculum.pool_safe:
        raise ValueError(f"config.curriculum.name={cfg.curriculum.name!r} builds its order / per-row "
                         f"state from the bank at init, but with config.data.pool_size="
                         f"{d.pool_size} every step streams a different pool of rows: use the "
                         f"resident bank (data.pool_size=0) or a curriculum that works on pools: "
                         f"{[n for n in curricula.names() if curricula.get(n).pool_safe]}.")
    objective = objectives.get(cfg.objective.name)

    exp = Experiment(cfg, mesh, rules, tokenizer, train_data, eval_data, bank, model_config,
                     graphdef, optimizer, lr_schedule, curriculum, objective, None, None,
                     bank_shardings, pools, stream_shardings, None, sparsity,
                     jax.tree.map(jnp.asarray, host_bank.meta()))
    abstract = jax.eval_shape(
        lambda: _abstract_state(exp, abstract_params_state))
    exp.abstract_state = abstract
    exp.state_shardings = _state_shardings(abstract, param_axes, mesh, rules, optimizer,
                                           example_sharding, num_rows, sparsity,
                                           nnx.to_pure_dict(abstract_params_state))
    model_params = nnx.to_pure_dict(abstract_params_state)
    param_shardings = sharding.tree_shardings(model_params, param_axes, mesh, rules)
    _warn_unsharded(model_params, param_axes, param_shardings, mesh, rules)
    if cfg.model.hf_path:
        exp.load_init_params = functools.partial(hf.load_hf_params, cfg.model.hf_path, hf_config,
                                                 param_shardings)
    elif cfg.model.get("init_from"):
        checkpoint.latest_step(cfg.model.init_from)  # a missing run fails here, not at init_state
        exp.load_init_params = functools.partial(checkpoint.load_params, cfg.model.init_from,
                                                 model_params, param_shardings)
    return exp


def _warn_unsharded(params, axes, shardings, mesh, rules) -> None:
    """Names the parameters the rules shard but whose dimensions the mesh axes do not divide:
    they are replicated instead (e.g. 2 KV heads on ``mesh.tensor=4``), which costs memory."""
    unfit = [(path, x.shape, wanted, got.spec) for (path, x), wanted, got in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree.leaves(jax.tree.map(lambda a: sharding.logical_to_mesh(tuple(a or ()), rules),
                                     axes, is_leaf=lambda a: a is None or isinstance(a, P))),
        jax.tree.leaves(shardings))
        if sharding.fit_spec(wanted, x.shape, mesh) != wanted]
    if unfit:
        shown = "; ".join(f"{sparsity_lib.base.path_str(p)} {tuple(shape)}: {want} -> {got}"
                          for p, shape, want, got in unfit[:3])
        logging.getLogger(__name__).warning(
            "%d parameter(s) cannot be sharded as config.sharding_rules ask on mesh %s and are "
            "replicated along the axes that do not divide them: %s%s.", len(unfit),
            dict(mesh.shape), shown, f" (and {len(unfit) - 3} more)" if len(unfit) > 3 else "")


def _paths(tree) -> list[str]:
    return [sparsity_lib.base.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _abstract_state(exp: Experiment, abstract_params_state):
    params = nnx.to_pure_dict(abstract_params_state)
    if exp.sparsity is not None and exp.sparsity.init_params is not None:
        params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
            exp.sparsity.init_params, params, jax.random.PRNGKey(0)))
    return TrainState(
        step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0), params=params,
        opt_state=exp.optimizer.init(params),
        curriculum=exp.curriculum.init(exp.config.curriculum, exp.host_meta),
        ref_params=params if _needs_ref(exp) else None,
        masks=_abstract_masks(exp.sparsity, params), rl=exp.trainer.init_extra(exp.config),
    )


def _abstract_masks(sparsity, params):
    if sparsity is None:
        return None
    shapes = jax.eval_shape(sparsity.init_masks, params, jax.random.PRNGKey(0))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _needs_ref(exp: Experiment) -> bool:
    """The frozen reference is the starting model, kept only when the objective or trainer
    reads it (KL anchors, GRPO's KL term, SPIN's opponent)."""
    return bool({"ref", "ref_logprob"} & set(exp.objective.needs)) or exp.trainer.needs_ref(exp.config)


def _state_shardings(abstract: TrainState, param_axes, mesh, rules, optimizer, example_sharding,
                     num_examples, sparsity=None, model_params=None):
    replicated = sharding.replicated(mesh)
    if sparsity is not None and sparsity.param_shardings is not None:
        params = sparsity.param_shardings(
            sharding.tree_shardings(model_params, param_axes, mesh, rules), replicated)
    else:
        params = sharding.tree_shardings(abstract.params, param_axes, mesh, rules)
    if sparsity is not None and sparsity.opt_state_shardings is not None:
        opt_state = sparsity.opt_state_shardings(abstract.opt_state, params, replicated)
    else:
        opt_state = optax.tree_map_params(
            optimizer, lambda _, s: s, abstract.opt_state, params,
            transform_non_params=lambda _: replicated)
    masks = None
    if abstract.masks is not None:
        mask_fn = (sparsity.mask_shardings if sparsity is not None and sparsity.mask_shardings
                   else sparsity_lib.base.like_params_shardings)
        masks = mask_fn(abstract.masks, params, replicated)

    def curriculum_leaf(x):
        # Per-example state (tracked losses, counts) is laid out like the bank's rows.
        if x.ndim >= 1 and x.shape[0] == num_examples:
            return NamedSharding(mesh, P(example_sharding.spec[0], *([None] * (x.ndim - 1))))
        return replicated

    return TrainState(step=replicated, rng=replicated, params=params, opt_state=opt_state,
                      curriculum=jax.tree.map(curriculum_leaf, abstract.curriculum),
                      ref_params=None if abstract.ref_params is None else params, masks=masks,
                      rl=jax.tree.map(lambda _: replicated, abstract.rl))


def _merged_categories(eval_records, train_categories: tuple[str, ...]) -> tuple[str, ...]:
    """Training category indices first, so per-category results line up with the bank's."""
    extra = sorted({r["category"] for r in eval_records} - set(train_categories))
    return train_categories + tuple(extra)

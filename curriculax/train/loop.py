"""The training loop: restore → jitted steps → periodic log / eval / checkpoint / plots.

The host only dispatches steps and writes logs. Metrics of a dispatch are fetched after the
*next* dispatch is queued, so the devices never wait for Python. SIGTERM (preemption) and
``config.stop_at`` both end the run with a checkpoint; rerunning the same command resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time

import jax
import numpy as np
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from curriculax import eval as eval_lib
from curriculax.train import checkpoint, distributed, plots, setup
from curriculax.train.metrics import MetricWriter

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _preemption_flag(handler: bool = True):
    """Yields a dict whose ``"stop"`` turns True on SIGTERM (main thread only).

    Multi-process runs pass ``handler=False``: JAX's runtime catches SIGTERM itself and the
    processes agree on a common stop step (:func:`distributed.reached_preemption`).
    """
    flag = {"stop": False}
    try:
        previous = (signal.signal(signal.SIGTERM, lambda *_: flag.update(stop=True))
                    if handler else None)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        previous = None
    try:
        yield flag
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def evaluate(exp: setup.Experiment, params) -> dict[str, float]:
    model = nnx.merge(exp.graphdef, exp.forward_params(params))
    e = exp.config.eval
    out = eval_lib.evaluate(model, exp.eval_data, exp.tokenizer, batch_size=e.batch_size,
                            max_new_tokens=e.max_new_tokens, judge=_judge(e.get("reward", "")),
                            mesh=exp.mesh, rules=exp.rules)
    return {f"eval/{k}": v for k, v in out.items()}


def _judge(reward_name: str):
    """``config.eval.reward`` as a pass/fail judge (None: compare final answers)."""
    if reward_name in ("", "math_answer"):
        return None
    from curriculax.rl import rewards

    if reward_name not in rewards.names():
        raise ValueError(f"config.eval.reward={reward_name!r} is unknown; choose one of "
                         f"{rewards.names()} (empty: compare final answers).")
    fn = rewards.get(reward_name)
    return lambda text, record: fn(text, record) >= 1.0


def _check_same_rows(saved: dict, info: dict, workdir) -> None:
    """Per-row curriculum state (orders, counts, bandit values) indexes bank rows: refuse a
    resume whose rows hold other examples, which would otherwise continue silently."""
    was, now = saved.get("bank", {}).get("fingerprint"), info.get("bank", {}).get("fingerprint")
    if was is not None and now is not None and was != now:
        raise ValueError(
            f"The training data differs from the run checkpointed in {workdir}: its rows now hold "
            f"other examples ({saved['bank'].get('examples')} rows then, {info['bank']['examples']} "
            f"now; fingerprint {was} vs {now}), so the restored curriculum state would describe "
            f"the wrong rows. Resume with the saving run's data settings (data.*, seed; see its "
            f"config.json), or start a fresh workdir with model.init_from={workdir} to continue "
            f"from its weights on the new data.")


def train(cfg, workdir) -> dict:
    """Trains per ``cfg`` in ``workdir``; returns the last logged train and eval metrics."""
    # Checkpoints, config.json and summary.json go to `workdir` (local or gs://, via epath);
    # metrics.jsonl, TensorBoard and plots to `local` (the same directory unless remote).
    workdir, local = epath.Path(str(workdir)), checkpoint.local_dir(workdir)
    lead = jax.process_index() == 0
    exp = setup.build(cfg)
    _judge(cfg.eval.get("reward", ""))  # a typo fails now, not at the first eval, eval_every steps on
    mngr = checkpoint.manager(workdir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints)
    info = {} if exp.train_data is None else {"bank": {
        "examples": len(exp.train_data), "truncated": exp.train_data.info.num_truncated,
        "dropped": exp.train_data.info.num_dropped, "fingerprint": exp.train_data.fingerprint()}}
    if mngr.latest_step() is not None:
        state, saved = checkpoint.restore(mngr, exp.abstract_state, exp.state_shardings)
        _check_same_rows(saved, info, workdir)
        log.info("restored checkpoint at step %d from %s", int(state.step), workdir)
    else:
        state = exp.init_state()
    if lead:  # only once the checkpoint fits: a refused resume keeps the saving run's config.json
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    step = int(state.step)
    stop = cfg.stop_at or cfg.steps
    compiled = {}
    tokens_per_step = exp.trainer.tokens_per_step(cfg)  # RL: sampled completion slots
    # step 0 is never checkpointed: a restart from it logs everything again (its step-0 eval
    # too), so a run that died before its first checkpoint leaves no records behind
    writer = MetricWriter(local, resume_step=step if step > 0 else -1) if lead else None
    last: dict = {}
    if step > 0 and (workdir / "summary.json").exists():  # resumed: carry on the run's summary
        with contextlib.suppress(ValueError):  # (a finished run runs no step; a torn one is rewritten)
            last.update(json.loads((workdir / "summary.json").read_text()))
    for name, data in (("train", exp.train_data), ("held-out", exp.eval_data)):
        if data is not None and data.info.num_dropped > 0:  # rows that never reach the model
            log.warning("%s data: %d of %d records dropped as longer than data.seq_len=%d (%d "
                        "truncated)", name, data.info.num_dropped, len(data) + data.info.num_dropped,
                        data.info.seq_len, data.info.num_truncated)

    def log_metrics(at_step, metrics, seconds, steps_done):
        host = {k: np.asarray(v)[-1] for k, v in jax.device_get(metrics).items()}
        host["tokens_per_s"] = tokens_per_step * steps_done / max(seconds, 1e-9)
        last.update(host)
        if writer:
            writer.write(at_step, host)
        return host

    def run_eval(at_step):
        result = evaluate(exp, state.params)
        last.update(result)
        if writer:
            writer.write(at_step, result)
            if cfg.plots:
                plots.draw(local)

    def actions(at_step):
        if at_step % cfg.eval_every == 0 or at_step == cfg.steps:
            run_eval(at_step)
        if at_step % cfg.checkpoint_every == 0 or at_step == stop:
            checkpoint.save(mngr, at_step, state, {"step": at_step, **info})

    if step == 0 and cfg.eval_at_start:  # the untrained baseline, for "how much did it learn"
        run_eval(0)

    bar = tqdm(total=stop, initial=step, disable=not (lead and cfg.progress_bar),
               desc="train", dynamic_ncols=True)
    pending = None  # (step, metrics on device, wall time at dispatch, steps since last log)
    t_log, steps_since = time.perf_counter(), 0
    spd = cfg.steps_per_dispatch

    def dispatch_size(at):  # back onto multiples of spd after a resume from an odd stop_at
        return min(spd - at % spd, stop - at)

    with _preemption_flag(handler=jax.process_count() == 1) as preempt:
        upcoming = exp.data_for(step, dispatch_size(step)) if step < stop else None
        dispatches = 0  # JAX's preemption sync point is one past the largest count reported
        while step < stop and not preempt["stop"]:
            k = dispatch_size(step)
            if k not in compiled:
                compiled[k] = exp.step_fn(k)
            state, metrics = compiled[k](state, upcoming)
            step += k
            dispatches += 1  # not `step`: with steps_per_dispatch > 1 it would skip that point
            preempt["stop"] |= distributed.reached_preemption(dispatches)  # multi-process
            if step < stop:  # prepared while the devices run the dispatch above
                upcoming = exp.data_for(step, dispatch_size(step))
            steps_since += k
            if pending is not None:  # fetched only now: the next dispatch is already queued
                host = log_metrics(*pending)
                bar.set_postfix(loss=f"{host['loss']:.4f}", tok_s=f"{host['tokens_per_s']:.0f}")
                pending = None
            if step % cfg.log_every == 0 or step == stop:
                now = time.perf_counter()
                pending = (step, metrics, now - t_log, steps_since)
                t_log, steps_since = now, 0
            bar.update(k)
            if step % cfg.eval_every == 0 or step % cfg.checkpoint_every == 0 or step == stop:
                if pending is not None:
                    log_metrics(*pending)
                    pending = None
                actions(step)
        if pending is not None:
            log_metrics(*pending)
        if preempt["stop"] and step < stop and mngr.latest_step() != step:  # not saved just now
            log.warning("SIGTERM: checkpointing step %d before exit", step)
            checkpoint.save(mngr, step, state, {"step": step, **info})
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    if writer:
        writer.close()
        if cfg.plots:
            plots.draw(local)
    last["step"] = step
    last["workdir"] = str(workdir)
    if lead:
        (workdir / "summary.json").write_text(  # vector metrics (per-arm values) as lists
            json.dumps(last, indent=2, default=lambda v: np.asarray(v).tolist()))
    return last

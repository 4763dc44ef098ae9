"""Command line: ``curriculax {train,eval,quickstart,s3ft} --config=FILE --workdir=DIR``.

``--config`` is an ml_collections config file (``configs/*.py`` with ``get_config()``);
fields are overridden with ``--config.steps=200``. Without ``--config`` the built-in
quickstart config is used.

Multi-host: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on every
process (or nothing on Cloud TPU VMs and under SLURM ``srun``, which describe themselves);
see ``docs/scale.md``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from curriculax.train import config as config_lib
from curriculax.train import distributed

def _unknown_key(e: Exception, argv) -> str:
    """One line for an unknown ``--config.<key>``: the full dotted key from the command line and
    ml_collections' spelling suggestion, if any."""
    text = str(e.args[0] if e.args else e).replace("\\'", "'")
    names = re.findall(r"'(\w+)'", text)
    name = names[0] if names else text.splitlines()[0]
    given = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
    full = next((g for g in given if name in g.split(".")), name)
    hint = re.search(r'Did you mean "(\w+)"', text)
    prefix = full.rsplit(".", 1)[0] + "." if "." in full else ""
    fix = (f": did you mean {prefix + hint.group(1)!r}?" if hint
           else "; check the spelling against the config file's fields.")
    return f"curriculax: unknown config key {full!r} in the command line{fix}"


try:  # with the built-in default, absl applies --config.<key> overrides right here, at import
    _CONFIG = config_flags.DEFINE_config_file(
        "config", f"{config_lib.__file__}:quickstart", "Experiment config file.", lock_config=True)
except (AttributeError, KeyError) as e:
    sys.exit(_unknown_key(e, sys.argv))
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process runs: host:port of process 0, the same on every process "
    "(jax.distributed.initialize). Not needed on Cloud TPU VMs or under SLURM.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-process runs: how many processes take part (1: single).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-process runs: this process's rank in [0, num_processes).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_init_timeout", 300,
    "Seconds to wait for every process to join the coordinator before failing with one error.")


def _train(cfg, workdir):
    from curriculax.train import train

    return train(cfg, workdir)


def _eval(cfg, workdir):
    from curriculax.train import checkpoint, evaluate, setup

    mngr = checkpoint.saved(workdir)  # before any build: a missing checkpoint is one line
    # the workdir's checkpoint replaces the starting weights: a config need not name them here
    cfg = copy.deepcopy(cfg)
    cfg.required_fields = tuple(f for f in cfg.required_fields if f != "model.init_from")
    exp = setup.build(cfg)
    state, _ = checkpoint.restore(mngr, exp.abstract_state, exp.state_shardings)
    return {"step": int(state.step), **evaluate(exp, state.params)}


def _quickstart(cfg, workdir):
    result = _train(cfg, workdir)
    print(f"\nQuickstart finished at step {result['step']}: train loss {result.get('loss', float('nan')):.3f}, "
          f"held-out accuracy {result.get('eval/accuracy', float('nan')):.1%}.")
    print(f"Metrics: {workdir}/metrics.jsonl   TensorBoard: {workdir}/tensorboard")
    print(f"Plots:   {workdir}/training.png  {workdir}/curriculum.png")
    return result


def _s3ft(cfg, workdir):
    """S3FT: targets from the starting model (own correct answers, else paraphrase or gold),
    written to ``workdir/s3ft_train.jsonl``, then ordinary SFT on them in ``workdir``."""
    from curriculax.rl import s3ft

    sft, counts = s3ft.prepare(cfg, workdir)
    print(f"S3FT targets: {counts} -> {workdir}/s3ft_train.jsonl")
    return {**_train(sft, workdir), **{f"s3ft/{k}": v for k, v in counts.items()}}


COMMANDS = {"train": _train, "eval": _eval, "quickstart": _quickstart, "s3ft": _s3ft}


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: curriculax {{{','.join(COMMANDS)}}} --config=FILE --workdir=DIR")
    command = argv[1]
    workdir = _WORKDIR.value or ("runs/quickstart" if command == "quickstart" else None)
    if workdir is None:
        raise app.UsageError(f"curriculax {command} needs --workdir=DIR.")
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:  # before anything else touches JAX
        proc = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                      timeout_s=_INIT_TIMEOUT.value)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"curriculax {command}: distributed init failed: {e}")
    if proc.process_count > 1:
        print(f"curriculax: {proc.describe()}", file=sys.stderr, flush=True)
    try:
        result = COMMANDS[command](_CONFIG.value, workdir)
    except (ValueError, FileNotFoundError) as e:  # config and data errors: one clear line
        if os.environ.get("CURRICULAX_DEBUG"):
            raise
        sys.exit(f"curriculax {command}: {e}\n(set CURRICULAX_DEBUG=1 for the traceback)")
    if command != "quickstart":
        from curriculax.train.metrics import to_python  # vector metrics (per-arm values) as lists

        json.dump(result, sys.stdout, indent=2, default=to_python)
        print()


def _parse_flags(argv):
    """absl parsing with one readable line for an unknown ``--config.<key>`` or a bad value."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.get("steps")  # a missing or broken --config file fails here, not mid-run
        return rest
    except (AttributeError, KeyError) as e:
        sys.exit(_unknown_key(e, argv))
    except OSError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        sys.exit(f"curriculax: --config={flags.FLAGS['config'].config_filename}: cannot load it "
                 f"({lines[-1]}).")
    except flags.Error as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if "Traceback (most recent call last):" in lines:  # a get_config(ARG) that raised: its last line
            sys.exit(f"curriculax: {lines[0]} {lines[-1]}")
        sys.exit(f"curriculax: {e}")


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()

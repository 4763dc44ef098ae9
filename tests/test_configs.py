"""Every config file loads, names its required fields, and the CPU-sized ones build."""

import pathlib

import pytest

from curriculax.train import build
from curriculax.train.config import sibling_config, validate

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
ARGS = {
    "quickstart": [None], "gsm8k_sft": [None], "curricula_arith": ["uniform", "sec"],
    "sec_countdown": ["warmup", "uniform", "ordered", "sec"], "sec_math": ["sec", "uniform"],
    "reft_sft": ["tiny", "gsm8k"], "reft_rl": ["tiny", "gsm8k"],
    "curr_reft": ["warmup", "judge", "choice", "open"],
}


def load(name, arg):
    return sibling_config(str(CONFIGS / f"{name}.py"), name, arg)


def test_every_config_file_is_listed():
    assert {p.stem for p in CONFIGS.glob("*.py")} == set(ARGS)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_config_loads_and_requires_what_it_says(name, arg):
    cfg = load(name, arg)
    for field in cfg.required_fields:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            validate(cfg)
        section, key = field.split(".")
        cfg[section][key] = "/somewhere"
    validate(cfg)


@pytest.mark.parametrize("name,arg", [("sec_countdown", "sec"), ("reft_rl", "tiny"),
                                      ("curr_reft", "choice")])
def test_cpu_configs_build(name, arg):
    cfg = load(name, arg)
    cfg.required_fields = ()
    cfg.data.num_train, cfg.data.num_eval = 64, 8
    exp = build(cfg)
    assert exp.config.trainer == "rl" and exp.abstract_state.params is not None
    with pytest.raises(ValueError, match="unknown|Unknown"):
        bad = load(name, arg)
        bad.rl.loss = "ppo_value_head"
        bad.required_fields = ()
        bad.data.num_train, bad.data.num_eval = 64, 8
        build(bad)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_file_configs_load_disjoint_train_and_held_out_data(name, arg, monkeypatch):
    """The configs that read ../shared data get both sets, disjoint (sec_math once had none)."""
    from curriculax.data.sources import load_records

    cfg = load(name, arg)
    if not cfg.data.get("path"):
        pytest.skip("generated data")
    monkeypatch.chdir(CONFIGS.parent)  # the configs' paths are relative to the repository
    if not pathlib.Path(cfg.data.path).exists():
        pytest.skip("../shared/data is not there")
    train, held_out = load_records(cfg.data, cfg.seed)
    assert train and held_out, (len(train), len(held_out))
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_every_curriculum_setting_is_a_config_key(name, arg):
    """--config.curriculum.<key>=... only reaches keys the file creates: a file listing a few
    (tau, alpha) made the CLI refuse the others (e.g. arms) as unknown keys."""
    from curriculax import curriculum as curricula

    cur = load(name, arg).curriculum
    assert set(curricula.config(cur.name)) <= set(cur), cur.name
    with pytest.raises(ValueError, match=r"Unknown settings \['tua'\] for curriculum 'sec'"):
        curricula.config("sec", tua=0.4)

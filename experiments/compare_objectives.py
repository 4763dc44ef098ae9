"""Compare fine-tuning objectives and input-side curricula on synthetic arithmetic.

Protocol (one CPU, minutes):

1. **Base model** (per seed): a byte-level Llama-style model trained with SFT on 1-step
   arithmetic (``--base-steps``). It plays the "pretrained model" that the papers fine-tune
   (and ASFT's frozen anchor).
2. **Fine-tuning** (per method x seed, all from that seed's base): difficulty 1..``--train-max``
   (default 2) for ``--steps`` steps with the same optimizer, data and batch for every method.
3. **Evaluation**: greedy exact match and teacher-forced response NLL / token accuracy on
   in-distribution problems (difficulty 1..train-max) and out-of-distribution, harder ones
   (difficulty train-max+1 and train-max+2). Held-out prompts never appear in training.

Methods: SFT, DFT, ASFT (kl 0.05), OTR (beta 0.1), Masked Thought (SFT + masking, p 0.4 with
linear warm-up), token-weighted (TL-Training PKT key tokens = first token + answer line).

Seeds change the model init, the sampling order and the method's randomness; the data set is
the same for every seed. 95% CIs are Student-t over seeds (mean +- t_{n-1} sd / sqrt(n)).

    python experiments/compare_objectives.py                 # full run (~20 min on 2 CPU cores)
    python experiments/compare_objectives.py --quick         # smoke test (~2 min)

Writes ``<out>/objectives.json``, ``<out>/objectives_table.md`` and ``<out>/objectives.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from curriculax import eval as eval_lib  # noqa: E402
from curriculax.data.bank import ExampleBank  # noqa: E402
from curriculax.data.sources import load_records  # noqa: E402
from curriculax.data.synthetic import arithmetic  # noqa: E402
from curriculax.models import Transformer  # noqa: E402
from curriculax.models.generate import generate  # noqa: E402
from curriculax.objectives import asft, dft, otr, token_weighted  # noqa: E402
from curriculax.train import build, quickstart_config  # noqa: E402
from curriculax.train.step import jit_steps  # noqa: E402
from curriculax.transforms import masked_thought  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def method_configs():
    """name -> function editing a config in place."""
    def sft(c):
        pass

    def use(objective_config):
        def edit(c):
            c.objective = objective_config
        return edit

    def mt(c):
        c.transforms = ("masked_thought",)
        c.transform_config.masked_thought = masked_thought.default_config()

    return {
        "sft": sft,
        "dft": use(dft.default_config()),
        "asft": use(asft.default_config()),
        "otr": use(otr.default_config()),
        "masked_thought": mt,
        "token_weighted": use(token_weighted.default_config("key_tokens")),
    }


def base_config(args, *, steps: int, max_difficulty: int):
    c = quickstart_config()
    c.seed = 0  # data seed: the same data for every run
    c.steps = steps
    c.batch_size = args.batch_size
    c.model.hidden_size, c.model.num_layers = args.hidden, args.layers
    c.model.intermediate_size, c.model.head_dim = 3 * args.hidden, args.hidden // 4
    c.model.num_heads, c.model.num_kv_heads = 4, 2
    c.model.max_seq_len = 320
    c.data.num_train = args.num_train
    c.data.num_eval = 8  # the loop's own eval set is unused; ours is built below
    c.data.min_difficulty, c.data.max_difficulty = 1, max_difficulty
    c.data.seq_len = args.seq_len
    c.optimizer.lr = args.lr
    c.optimizer.warmup_steps = max(1, steps // 10)
    c.mesh.num_devices, c.mesh.data = 1, 1
    c.progress_bar = False
    c.plots = False
    return c


def eval_banks(args, tokenizer, train_prompts, max_value):
    banks = {}
    lo, hi = 1, args.train_max
    for name, (a, b) in {"id": (lo, hi), "ood1": (hi + 1, hi + 1), "ood2": (hi + 2, hi + 2)}.items():
        recs = [r for r in arithmetic(4 * args.num_eval, 7919 + a * 31 + b, min_steps=a, max_steps=b,
                                     max_value=max_value)
                if r["prompt"] not in train_prompts][: args.num_eval]
        banks[name] = ExampleBank.build(recs, tokenizer, 320)
    return banks


def teacher_forced(model, bank: ExampleBank, batch: int = 64):
    """Mean response-token NLL and argmax token accuracy (teacher forcing)."""
    b = bank.bank
    nll = acc = count = 0.0

    @jax.jit
    def stats(tokens, targets, mask):
        logits = model.logits(model(tokens))
        lp = jax.nn.log_softmax(logits, -1)
        tl = jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
        ok = (jnp.argmax(logits, -1) == targets)
        m = mask.astype(jnp.float32)
        return jnp.sum(-tl * m), jnp.sum(ok * m), m.sum()

    for lo in range(0, len(bank), batch):
        sl = slice(lo, lo + batch)
        a, c, n = stats(jnp.asarray(b.tokens[sl]), jnp.asarray(b.targets[sl]), jnp.asarray(b.loss_mask[sl]))
        nll, acc, count = nll + float(a), acc + float(c), count + float(n)
    return nll / count, acc / count


def safe_answer(text):
    try:
        return eval_lib.extract_answer(text)
    except IndexError:  # older extract_answer raised on "####" followed by nothing
        return None


def exact_match(model, bank: ExampleBank, tokenizer, max_new_tokens: int) -> float:
    """Greedy-decoding exact match over the whole bank in one batch (one compilation)."""
    prompts, mask = bank.prompts()
    out = np.asarray(generate(model, prompts, max_new_tokens, eos_id=tokenizer.stop_ids,
                              pad_id=bank.info.pad_id, prompt_mask=mask))
    texts = [tokenizer.decode([int(t) for t in row if t != bank.info.pad_id]) for row in out]
    return float(np.mean([eval_lib.answers_match(safe_answer(t), a) for t, a in zip(texts, bank.answers)]))


def evaluate(graphdef, params, banks, tokenizer, max_new_tokens):
    model = nnx.merge(graphdef, params)
    out = {}
    for name, bank in banks.items():
        out[f"{name}_acc"] = exact_match(model, bank, tokenizer, max_new_tokens)
        out[f"{name}_nll"], out[f"{name}_tok_acc"] = teacher_forced(model, bank)
    return out


def random_params(model_config, seed):
    model = Transformer(model_config, rngs=nnx.Rngs(params=jax.random.PRNGKey(seed)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def run_steps(exp, state, steps: int, chunk: int = 10):
    chunk = math.gcd(steps, chunk) or 1  # run exactly `steps` steps (steps % 10 != 0 ran fewer)
    fn = jit_steps(exp.train_step(), chunk, exp.state_shardings, exp.bank_shardings)
    losses = []
    for _ in range(steps // chunk):
        state, m = fn(state, exp.bank)
        losses.extend(np.asarray(m["loss"]).tolist())
    return state, losses


def fresh_state(exp, params, seed):
    """A state at step 0 whose weights (and reference, if kept) are copies of ``params``."""
    state = exp.init_state()
    copy = lambda: jax.tree.map(jnp.array, params)  # noqa: E731  (the step donates its input)
    p = copy()
    return state.replace(params=p, opt_state=exp.optimizer.init(p), rng=jax.random.PRNGKey(1000 + seed),
                         ref_params=None if state.ref_params is None else copy())


def ci95(xs):
    xs = np.asarray(xs, float)
    if len(xs) < 2:
        return float(xs.mean()), float("nan")
    return float(xs.mean()), float(T975.get(len(xs) - 1, 1.96) * xs.std(ddof=1) / math.sqrt(len(xs)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--base-steps", type=int, default=120)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=160)
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-eval", type=int, default=96)
    p.add_argument("--train-max", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-new-tokens", type=int, default=72)
    p.add_argument("--methods", default="sft,dft,asft,otr,masked_thought,token_weighted")
    p.add_argument("--out", default=str(REPO / "experiments" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.base_steps, args.steps, args.num_train, args.num_eval = 2, 20, 20, 256, 16
        args.hidden, args.layers, args.batch_size, args.max_new_tokens = 64, 2, 8, 40
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    edits = method_configs()
    methods = [m for m in args.methods.split(",") if m]

    # 1. Base models: SFT on 1-step problems.
    base_cfg = base_config(args, steps=args.base_steps, max_difficulty=1)
    base_exp = build(base_cfg)
    ft_cfg = base_config(args, steps=args.steps, max_difficulty=args.train_max)
    train_prompts = {r["prompt"] for c in (base_cfg, ft_cfg) for r in load_records(c.data, c.seed)[0]}
    banks = eval_banks(args, base_exp.tokenizer, train_prompts, base_cfg.data.max_value)
    print("eval sets: " + ", ".join(f"{k}={len(v)}" for k, v in banks.items()), flush=True)

    bases, base_eval = {}, {}
    for seed in range(args.seeds):
        t = time.time()
        state = fresh_state(base_exp, random_params(base_exp.model_config, seed), seed)
        state, _ = run_steps(base_exp, state, args.base_steps)
        bases[seed] = jax.device_get(state.params)
        base_eval[seed] = evaluate(base_exp.graphdef, state.params, banks, base_exp.tokenizer,
                                   args.max_new_tokens)
        print(f"base seed {seed}: {base_eval[seed]}  ({time.time() - t:.0f}s)", flush=True)

    # 2. Fine-tune every method from every base.
    results = {"base": base_eval}
    for name in methods:
        cfg = base_config(args, steps=args.steps, max_difficulty=args.train_max)
        edits[name](cfg)
        exp = build(cfg)
        results[name] = {}
        for seed in range(args.seeds):
            t = time.time()
            state, losses = run_steps(exp, fresh_state(exp, bases[seed], seed), args.steps)
            ev = evaluate(exp.graphdef, state.params, banks, exp.tokenizer, args.max_new_tokens)
            ev.update(final_loss=float(np.mean(losses[-10:])), finite=bool(np.all(np.isfinite(losses))),
                      seconds=time.time() - t)
            results[name][seed] = ev
            print(f"{name} seed {seed}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()
                                                       if isinstance(v, float)), flush=True)

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": time.time() - t_start,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpu(s)",
        "python": platform.python_version(), "jax": jax.__version__,
        "args": vars(args), "eval_sizes": {k: len(v) for k, v in banks.items()},
        "params": int(sum(x.size for x in jax.tree.leaves(bases[0]))),
    }
    (out / "objectives.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                                    default=str))
    write_table(out, results, methods, meta, args)
    plot(out, results, methods, args)
    print(f"done in {meta['seconds']:.0f}s", flush=True)


METRICS = [("id_acc", "ID exact match"), ("ood1_acc", "OOD +1 step exact match"),
           ("ood2_acc", "OOD +2 steps exact match"), ("id_nll", "ID response NLL"),
           ("ood1_nll", "OOD +1 NLL"), ("ood2_nll", "OOD +2 NLL"),
           ("id_tok_acc", "ID token acc"), ("ood1_tok_acc", "OOD +1 token acc")]


def write_table(out, results, methods, meta, args):
    lines = [f"Fine-tuned {args.steps} steps from a {args.base_steps}-step base; "
             f"mean ± 95% CI over {args.seeds} seeds.", "",
             f"- date: {meta['date']}; machine: {meta['machine'].strip()}; versions: python "
             f"{meta['python']}, jax {meta['jax']}", "",
             "| method | " + " | ".join(label for _, label in METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|"]
    for name in ["base"] + methods:
        runs = results[name]
        cells = []
        for key, _ in METRICS:
            m, h = ci95([runs[s][key] for s in runs])
            cells.append(f"{m:.3f} ± {h:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "objectives_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(out, results, methods, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("id_acc", "ID exact match"), ("ood1_acc", "OOD (+1 step) exact match"),
              ("id_nll", "ID response NLL"), ("ood1_nll", "OOD (+1 step) response NLL")]
    names = ["base"] + methods
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        stats = [ci95([results[n][s][key] for s in results[n]]) for n in names]
        ax.bar(range(len(names)), [m for m, _ in stats], yerr=[h for _, h in stats], capsize=3,
               color=["#999"] + [f"C{i}" for i in range(len(methods))])
        for i, n in enumerate(names):
            ys = [results[n][s][key] for s in results[n]]
            ax.scatter([i] * len(ys), ys, s=8, color="k", zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"Objectives on synthetic arithmetic (train difficulty ≤ {args.train_max}; "
                 f"{args.seeds} seeds, 95% CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "objectives.png", dpi=120)


if __name__ == "__main__":
    main()

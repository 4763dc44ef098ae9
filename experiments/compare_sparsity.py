"""Compare parameter-selection methods: full FT, LIFT (several budgets), LoRA, HFT, LT-SFT.

Protocol (2 CPU cores, about 33 minutes with the defaults in experiments/results/sparsity.md):

1. **Source task / base model** (per seed): a byte-level Llama-style model trained from scratch
   with full fine-tuning on the *source* task, add/subtract word problems (arithmetic category
   ``addsub``, 1-2 steps), for ``--base-steps`` steps. Every method starts from this model.
2. **Target task** (per method x seed, same data, batch, learning rate and schedule):
   multiplication word problems (category ``mul``, 1-2 steps) for ``--steps`` steps.
3. **Measured** after fine-tuning, on held-out problems (``--num-eval`` each; prompts seen in
   training are dropped): greedy exact match and teacher-forced response NLL on the target task
   in distribution (``mul``, 1-2 steps) and out of distribution (``mul``, 3 steps), and on the
   source task (``addsub``, 1-2 steps). *Forgetting* = source NLL after minus before (and the
   drop of source accuracy). Also: optimizer-state bytes (every array in ``opt_state``; masks
   separately), trained-parameter count, median step time (``block_until_ready`` per step, not
   interleaved: use ``--time-only`` for a fairer timing) and the final train loss (mean of the
   last 10 steps).
4. **GSM8K-small** (when ``../shared/data/gsm8k`` exists): from the same base model, every
   method fine-tunes on the ``--gsm8k-train`` shortest-enough GSM8K training problems (prompt +
   response within ``--gsm8k-seq-len`` bytes) for ``--gsm8k-steps`` steps; measured: held-out
   response NLL on ``--gsm8k-eval`` test problems (a 1M-parameter byte model gets no GSM8K
   answer right, so exact match is not measured) and the source-task NLL (forgetting).

Budgets: LoRA rank ``--rank`` on every projection; LIFT at each ``--lift-ranks`` r with the
LoRA-equivalent budget ``(m+n)·r`` per matrix; LT-SFT at the density of LIFT with r = ``--rank``
(full FT for the first half, then sparse); HFT half of the matrices. The learning rate is the
same for every method (tuned for nothing). Seeds draw the base model, the data and the order.

    python experiments/compare_sparsity.py              # ~33 min on 2 shared CPU cores
    python experiments/compare_sparsity.py --quick      # smoke test (~3 min)
    python experiments/compare_sparsity.py --time-only --rounds 4   # interleaved step times

Writes ``<out>/sparsity.json`` (every run; seeds already there are skipped on a rerun with the
same arguments), ``<out>/sparsity_table.md`` (header, setup and tables; the discussion lives in
``sparsity.md``) and ``<out>/sparsity_tradeoff.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from scipy import stats  # noqa: E402

from curriculax import eval as eval_lib  # noqa: E402
from curriculax import objectives, sparsity  # noqa: E402
from curriculax.data import jsonl as jsonl_lib  # noqa: E402
from curriculax.data import synthetic  # noqa: E402
from curriculax.data.bank import ExampleBank  # noqa: E402
from curriculax.models.generate import generate  # noqa: E402
from curriculax.sparsity import lift  # noqa: E402
from curriculax.train import build, quickstart_config  # noqa: E402
from curriculax.train.step import jit_steps  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import report  # noqa: E402

SOURCE_CAT, TARGET_CAT = "addsub", "mul"
EVAL_SEQ = 224  # held-out arithmetic banks (3-step mul rows reach ~205 bytes)


# Data ----------------------------------------------------------------------------------------

def arith(n, seed, cat, lo, hi, exclude=(), max_value=100):
    recs = synthetic.arithmetic(4 * n if exclude else n, seed, min_steps=lo, max_steps=hi,
                                categories=(cat,), max_value=max_value)
    recs = [r for r in recs if r["prompt"] not in exclude]
    return [dict(r, id=f"{cat}-{seed}-{i}") for i, r in enumerate(recs[:n])]


def task_records(args, seed):
    src = arith(args.num_train, seed, SOURCE_CAT, 1, 2)
    tgt = arith(args.num_train, seed + 1000, TARGET_CAT, 1, 2)
    seen = {r["prompt"] for r in src + tgt}
    return {
        "source_train": src, "target_train": tgt,
        "source": arith(args.num_eval, seed + 7919, SOURCE_CAT, 1, 2, seen),
        "target_id": arith(args.num_eval, seed + 7920, TARGET_CAT, 1, 2, seen),
        "target_ood": arith(args.num_eval, seed + 7921, TARGET_CAT, 3, 3, seen),
    }


def gsm8k_records(args):
    root = pathlib.Path(args.shared) / "data" / "gsm8k"
    if not (root / "train.jsonl").exists() or not (root / "test.jsonl").exists():
        return None

    def fitting(path, n):
        fit = [r for r in jsonl_lib.gsm8k(path)
               if len((r["prompt"] + r["response"]).encode()) + 2 <= args.gsm8k_seq_len]
        return fit[:n]
    return fitting(root / "train.jsonl", args.gsm8k_train), fitting(root / "test.jsonl",
                                                                    args.gsm8k_eval)


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


# Configs and runs -----------------------------------------------------------------------------

def make_config(args, *, train_path, eval_path, steps, seed, batch_size=None, seq_len=160):
    c = quickstart_config()
    c.seed = seed
    c.steps = steps
    c.batch_size = batch_size or args.batch_size
    c.model.hidden_size, c.model.num_layers = args.hidden, args.layers
    c.model.intermediate_size, c.model.head_dim = 3 * args.hidden, args.hidden // 4
    c.model.max_seq_len = max(seq_len, EVAL_SEQ)
    c.data.source = "jsonl"
    c.data.path, c.data.eval_path = train_path, eval_path
    c.data.num_train, c.data.num_eval = 0, args.num_eval  # 0: every row of the file
    c.data.min_difficulty = c.data.eval_min_difficulty = 1
    c.data.max_difficulty = c.data.eval_max_difficulty = 100
    c.data.seq_len = seq_len
    c.optimizer.lr = args.lr
    c.optimizer.warmup_steps = max(1, steps // 10)
    c.mesh.num_devices, c.mesh.data = 1, 1
    c.eval.max_new_tokens = args.max_new_tokens
    c.progress_bar = c.plots = False
    return c


def methods(args, density, refresh_every=None):
    r, refresh = args.rank, refresh_every or args.refresh_every
    out = {"full": sparsity.config("none")}
    for lr in sorted(int(x) for x in args.lift_ranks.split(",")):
        out[f"lift_r{lr}"] = sparsity.config("lift", lora_rank=lr, filter_rank=args.filter_rank,
                                             refresh_every=refresh)
    out[f"lora_r{r}"] = sparsity.config("lora", rank=r, alpha=2.0 * r)
    out["hft"] = sparsity.config("hft")
    out["lt_sft"] = sparsity.config("lt_sft", density=density)
    wanted = args.methods.split(",") if args.methods else list(out)
    return {k: v for k, v in out.items() if k in wanted or k.split("_r")[0] in wanted}


def lift_density(args, cfg):
    cfg = cfg.copy_and_resolve_references()
    cfg.sparsity = sparsity.config("lift", lora_rank=args.rank, filter_rank=args.filter_rank,
                                   refresh_every=args.refresh_every)
    return lift.fraction(build(cfg).abstract_state.params, cfg)


def run(cfg, params, steps):
    exp = build(cfg)
    exp.load_init_params = lambda: params
    state = exp.init_state()
    fn = jit_steps(exp.train_step(), 1, exp.state_shardings, exp.bank_shardings)
    losses, times = [], []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = fn(state, exp.bank)
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - t)
        losses.append(float(m["loss"][0]))
    return exp, state, np.array(losses), np.array(times[1:])


def nbytes(tree):
    return 0 if tree is None else lift.state_bytes(tree)


def trained_count(name, state):
    p = state.params
    if name == "full":
        return sum(x.size for x in jax.tree.leaves(p))
    if name.startswith("lora"):
        return sum(x.size for x in jax.tree.leaves(p["lora"]))
    if name.startswith("lift"):
        return sum(m.size if m.ndim else 0 for m in jax.tree.leaves(state.masks))
    if name == "hft":
        return int(sum(x.size * bool(m) for x, m in zip(jax.tree.leaves(p),
                                                         jax.tree.leaves(state.masks))))
    return int(sum(int(np.sum(m)) for m in jax.tree.leaves(state.masks["select"])))


# Evaluation ----------------------------------------------------------------------------------

_JIT: dict = {}


def _row_nll(graphdef):
    if ("nll", graphdef) not in _JIT:
        @jax.jit
        def f(params, tok, tgt, mask):
            model = nnx.merge(graphdef, params)
            st = objectives.lm_head_stats(model(tok), model.lm_head_weight(), tgt, mask)
            m = mask.astype(jnp.float32)
            return jnp.sum(-st.target_logprob * m, 1) / jnp.maximum(m.sum(1), 1.0)
        _JIT[("nll", graphdef)] = f
    return _JIT[("nll", graphdef)]


def response_nll(graphdef, params, bank: ExampleBank, batch=64) -> float:
    """Mean over held-out rows of the per-row mean response-token NLL (teacher forcing)."""
    b, n, out = bank.bank, len(bank), []
    f = _row_nll(graphdef)
    for lo in range(0, n, batch):
        idx = np.minimum(np.arange(lo, lo + batch), n - 1)  # fixed shapes: one compilation
        out.append(np.asarray(f(params, b.tokens[idx], b.targets[idx], b.loss_mask[idx]))
                   [: min(batch, n - lo)])
    return float(np.concatenate(out).mean())


def accuracy(model, bank: ExampleBank, tokenizer, max_new_tokens, batch=64) -> float:
    """Greedy exact match; prompts left-padded to the bank's width (one compilation per bank
    width and batch, whatever the seed)."""
    n, correct = len(bank), []
    for lo in range(0, n, batch):
        idx = list(range(lo, min(lo + batch, n)))
        toks, mask = bank.prompts(idx)
        width = bank.info.seq_len
        pad_r, pad_c = batch - len(idx), width - toks.shape[1]
        toks = np.pad(toks, ((0, pad_r), (pad_c, 0)), constant_values=bank.info.pad_id)
        mask = np.pad(mask, ((0, pad_r), (pad_c, 0)))
        mask[len(idx):, -1] = True
        out = np.asarray(generate(model, toks, max_new_tokens, eos_id=tokenizer.stop_ids,
                                  pad_id=bank.info.pad_id, prompt_mask=mask))
        for r, i in enumerate(idx):
            text = tokenizer.decode([int(t) for t in out[r] if t != bank.info.pad_id])
            correct.append(eval_lib.answers_match(eval_lib.extract_answer(text),
                                                  bank.answers[i]))
    return float(np.mean(correct))


def measure(exp, params, banks, args, with_accuracy=("source", "target_id", "target_ood")):
    model_params = jax.device_get(exp.model_params(params))
    model = nnx.merge(exp.graphdef, model_params)
    out = {}
    for name, bank in banks.items():
        out[f"{name}_nll"] = response_nll(exp.graphdef, model_params, bank)
        if name in with_accuracy:
            out[f"{name}_acc"] = accuracy(model, bank, exp.tokenizer, args.max_new_tokens)
    return out


# Main ----------------------------------------------------------------------------------------

def run_seed(args, seed, tmp, gsm):
    recs = task_records(args, seed)
    paths = {k: write_jsonl(tmp / f"{k}_{seed}.jsonl", v) for k, v in recs.items()}
    base_cfg = make_config(args, train_path=paths["source_train"], eval_path=paths["source"],
                           steps=args.base_steps, seed=seed)
    t = time.time()
    exp, state, losses, _ = run(base_cfg, None, args.base_steps)
    base_params = jax.device_get(state.params)
    tok = exp.tokenizer
    banks = {k: ExampleBank.build(recs[k], tok, EVAL_SEQ)
             for k in ("source", "target_id", "target_ood")}
    if gsm is not None:
        gsm_paths = (write_jsonl(tmp / "gsm8k_train.jsonl", gsm[0]),
                     write_jsonl(tmp / "gsm8k_test.jsonl", gsm[1]))
        banks["gsm8k"] = ExampleBank.build(gsm[1], tok, args.gsm8k_seq_len)
    out = {"base": {"train_loss": float(losses[-10:].mean()), "seconds": time.time() - t,
                    **measure(exp, base_params, banks, args)}}
    print(f"seed {seed} base: " + ", ".join(f"{k}={v:.4g}" for k, v in out["base"].items()),
          flush=True)
    ft = lambda **kw: make_config(args, train_path=paths["target_train"],  # noqa: E731
                                  eval_path=paths["target_id"], seed=seed, **kw)
    density = lift_density(args, ft(steps=args.steps))
    total = sum(x.size for x in jax.tree.leaves(base_params))
    for name, sp in methods(args, density).items():
        cfg = ft(steps=args.steps)
        cfg.sparsity = sp
        t = time.time()
        exp, state, losses, times = run(cfg, base_params, args.steps)
        t_train = time.time() - t
        row = dict(train_loss=float(losses[-10:].mean()), train_seconds=t_train,
                   opt_state_bytes=nbytes(state.opt_state), mask_bytes=nbytes(state.masks),
                   trained=trained_count(name, state), total_params=total,
                   step_ms=1e3 * float(np.median(times)),
                   **measure(exp, state.params,
                             {k: v for k, v in banks.items() if k != "gsm8k"}, args))
        row["seconds"] = time.time() - t
        out.setdefault("arith", {})[name] = row
        print(f"seed {seed} arith {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()),
              flush=True)
    if gsm is None:
        return out
    refresh = max(1, min(args.refresh_every, args.gsm8k_steps // 2))
    gcfg = lambda: make_config(  # noqa: E731
        args, train_path=gsm_paths[0], eval_path=gsm_paths[1], steps=args.gsm8k_steps,
        seed=seed, batch_size=args.gsm8k_batch, seq_len=args.gsm8k_seq_len)
    gdensity = lift_density(args, gcfg())
    for name, sp in methods(args, gdensity, refresh).items():
        cfg = gcfg()
        cfg.sparsity = sp
        t = time.time()
        exp, state, losses, times = run(cfg, base_params, args.gsm8k_steps)
        row = dict(train_seconds=time.time() - t, train_loss=float(losses[-5:].mean()),
                   step_ms=1e3 * float(np.median(times)),
                   **measure(exp, state.params, {k: banks[k] for k in ("gsm8k", "source")},
                             args, with_accuracy=("source",)))
        row["seconds"] = time.time() - t
        out.setdefault("gsm8k", {})[name] = row
        print(f"seed {seed} gsm8k {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()),
              flush=True)
    return out


def main():
    if os.environ.get("SPARSITY_JAX_CACHE", "1") != "0":  # seeds 1.. reuse seed 0's compilations
        jax.config.update("jax_compilation_cache_dir",
                          os.path.join(tempfile.gettempdir(), "curriculax_sparsity_jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--num-train", type=int, default=4000)
    ap.add_argument("--num-eval", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank; LT-SFT uses LIFT's density "
                    "at this rank")
    ap.add_argument("--lift-ranks", default="2,4,8", help="LIFT budgets (LoRA-equivalent ranks)")
    ap.add_argument("--filter-rank", type=int, default=16)
    ap.add_argument("--refresh-every", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--methods", default="",
                    help="comma list (full,lift,lift_r4,lora,hft,lt_sft); empty: all")
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--gsm8k-train", type=int, default=512)
    ap.add_argument("--gsm8k-eval", type=int, default=128)
    ap.add_argument("--gsm8k-seq-len", type=int, default=384)
    ap.add_argument("--gsm8k-steps", type=int, default=40)
    ap.add_argument("--gsm8k-batch", type=int, default=16)
    ap.add_argument("--no-gsm8k", action="store_true")
    ap.add_argument("--out", default=str(REPO / "experiments" / "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--time-only", action="store_true",
                    help="only step times, methods interleaved round-robin (fairer on a shared CPU)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.quick:
        args.base_steps, args.steps, args.num_train, args.num_eval = 10, 10, 256, 8
        args.hidden, args.layers, args.batch_size, args.refresh_every = 64, 2, 8, 4
        args.seeds, args.gsm8k_train, args.gsm8k_eval, args.gsm8k_steps = 2, 32, 8, 4
        args.gsm8k_batch, args.max_new_tokens = 4, 16
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.time_only:
        return time_only(args, out)
    gsm = None if args.no_gsm8k else gsm8k_records(args)
    if gsm is None and not args.no_gsm8k:
        print(f"GSM8K skipped: no {args.shared}/data/gsm8k/{{train,test}}.jsonl", flush=True)
    path = out / "sparsity.json"
    prev = json.loads(path.read_text()) if path.exists() else {}
    same = prev.get("meta", {}).get("args") == {k: v for k, v in vars(args).items()}
    results = prev.get("results", {}) if same else {}
    t0 = time.time()
    spent = prev.get("meta", {}).get("seconds", 0.0) if same else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            if str(seed) in results:
                print(f"seed {seed}: already in {path}", flush=True)
                continue
            results[str(seed)] = run_seed(args, seed, pathlib.Path(tmp), gsm)
            meta = {"date": time.strftime("%Y-%m-%d %H:%M"),
                    "seconds": spent + time.time() - t0,
                    "machine": f"{report.cpu_model()}, {os.cpu_count()} cores (shared)",
                    "jax": jax.__version__, "args": vars(args),
                    "gsm8k": None if gsm is None else {"train": len(gsm[0]),
                                                       "eval": len(gsm[1])},
                    "gsm8k_skipped": gsm is None}
            path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    meta = json.loads(path.read_text())["meta"]
    text = render(results, meta, args)
    report.write(out / "sparsity_table.md", text)
    plot(results, out / "sparsity_tradeoff.png")


# Report --------------------------------------------------------------------------------------

def ci95(values) -> tuple[float, float]:
    """Mean and half-width of the 95% t interval over seeds (as in compare_curricula.py)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def fmt(values, pct=False, digits=3, sign=False) -> str:
    m, h = ci95(values)
    s = 100.0 if pct else 1.0
    d = 1 if pct else digits
    return f"{m * s:{'+' if sign else ''}.{d}f} ± {h * s:.{d}f}"


def render(results, meta, args) -> str:
    seeds = sorted(results, key=int)
    per = lambda part, m, k: [results[s][part][m][k] for s in seeds]  # noqa: E731
    base = lambda k: [results[s]["base"][k] for s in seeds]  # noqa: E731
    names = list(results[seeds[0]]["arith"])
    a = meta["args"]
    extra = {"command": "`python experiments/compare_sparsity.py "
             + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in a.items()
                        if k not in ("out", "time_only", "rounds", "shared") and v is not False)
             + "`",
             "wall time": f"{meta['seconds'] / 60:.1f} min on the shared CPU",
             "seeds": len(seeds)}
    text = report.header("Parameter selection: full FT vs LIFT vs LoRA vs HFT vs LT-SFT", extra)
    text += (f"\nSource task (base model, full FT from scratch, {a['base_steps']} steps): "
             f"`{SOURCE_CAT}` 1-2 steps. Target task ({a['steps']} steps, batch "
             f"{a['batch_size']}, lr {a['lr']}): `{TARGET_CAT}` 1-2 steps (ID); OOD: "
             f"`{TARGET_CAT}` 3 steps. {a['num_eval']} held-out problems per set. "
             "Values: mean ± 95% CI (t, over seeds). acc = greedy exact match, NLL = "
             "teacher-forced response NLL (nats/token).\n")
    rows = [{"method": "base (before FT)", "target ID acc %": fmt(base("target_id_acc"), True),
             "target OOD acc %": fmt(base("target_ood_acc"), True),
             "target ID NLL": fmt(base("target_id_nll")),
             "target OOD NLL": fmt(base("target_ood_nll")),
             "source acc %": fmt(base("source_acc"), True), "source NLL": fmt(base("source_nll"))}]
    for m in names:
        rows.append({"method": m, "train loss": fmt(per("arith", m, "train_loss")),
                     "target ID acc %": fmt(per("arith", m, "target_id_acc"), True),
                     "target OOD acc %": fmt(per("arith", m, "target_ood_acc"), True),
                     "target ID NLL": fmt(per("arith", m, "target_id_nll")),
                     "target OOD NLL": fmt(per("arith", m, "target_ood_nll")),
                     "source acc %": fmt(per("arith", m, "source_acc"), True),
                     "source NLL": fmt(per("arith", m, "source_nll"))})
    text += "\n## Arithmetic: accuracy and NLL after fine-tuning on the target task\n\n"
    text += report.table(rows, ["method", "train loss", "target ID acc %", "target OOD acc %",
                                "target ID NLL", "target OOD NLL", "source acc %",
                                "source NLL"])
    rows = []
    for m in names:
        drop_acc = [b - x for b, x in zip(base("source_acc"), per("arith", m, "source_acc"))]
        rise_nll = [x - b for b, x in zip(base("source_nll"), per("arith", m, "source_nll"))]
        f_acc = [b - x for b, x in zip(base("source_acc"), per("arith", "full", "source_acc"))]
        f_nll = [x - b for b, x in zip(base("source_nll"), per("arith", "full", "source_nll"))]
        rows.append({"method": m, "source acc drop (pp)": fmt(drop_acc, True, sign=True),
                     "source NLL rise": fmt(rise_nll, sign=True),
                     "Δ NLL rise vs full": "-" if m == "full" else fmt(
                         np.subtract(rise_nll, f_nll), sign=True),
                     "Δ acc drop vs full (pp)": "-" if m == "full" else fmt(
                         np.subtract(drop_acc, f_acc), True, sign=True)})
    text += ("\n## Forgetting of the source task (after − before; paired per seed)\n\n"
             "Positive = forgot. Δ vs full: the method's forgetting minus full FT's on the same "
             "seed (negative = forgets less than full FT).\n\n")
    text += report.table(rows)
    rows = []
    for m in names:
        if m == "full":
            continue
        d = lambda k: np.subtract(per("arith", m, k), per("arith", "full", k))  # noqa: E731
        rows.append({"method": m, "Δ target ID acc (pp)": fmt(d("target_id_acc"), True, sign=True),
                     "Δ target OOD acc (pp)": fmt(d("target_ood_acc"), True, sign=True),
                     "Δ target ID NLL": fmt(d("target_id_nll"), sign=True),
                     "Δ target OOD NLL": fmt(d("target_ood_nll"), sign=True),
                     "Δ source NLL": fmt(d("source_nll"), sign=True)})
    text += ("\n## Paired difference to full FT (method − full, per seed)\n\n"
             "NLL: negative = better than full FT; accuracy: positive = better.\n\n")
    text += report.table(rows)
    text += pairs_table(results, seeds, names, a["rank"])
    rows = []
    for m in names:
        share = np.mean(per("arith", m, "trained")) / np.mean(per("arith", m, "total_params"))
        rows.append({"method": m,
                     "trained params": f"{int(np.mean(per('arith', m, 'trained'))):,} "
                                       f"({share:.1%})",
                     "opt-state bytes": f"{int(np.mean(per('arith', m, 'opt_state_bytes'))):,}",
                     "mask bytes": f"{int(np.mean(per('arith', m, 'mask_bytes'))):,}",
                     "step ms (median, not interleaved)": fmt(per("arith", m, "step_ms"),
                                                              digits=0)})
    text += "\n## Memory and step time (arithmetic runs)\n\n" + report.table(rows)
    if meta.get("gsm8k_skipped"):
        text += "\n## GSM8K-small\n\nSkipped: `../shared/data/gsm8k` was not found.\n"
        return text
    g = meta["gsm8k"]
    gnames = list(results[seeds[0]]["gsm8k"])
    text += (f"\n## GSM8K-small: held-out response NLL\n\nFrom the same base models: "
             f"{g['train']} GSM8K training problems whose prompt + response fit in "
             f"{a['gsm8k_seq_len']} bytes, {a['gsm8k_steps']} steps of batch "
             f"{a['gsm8k_batch']} (LIFT refresh every "
             f"{max(1, min(a['refresh_every'], a['gsm8k_steps'] // 2))} steps); NLL on the "
             f"first {g['eval']} such test problems. Exact match is not measured (0 for every "
             "method at this scale). Source NLL: the arithmetic source task after GSM8K "
             "fine-tuning (forgetting).\n\n")
    rows = [{"method": "base (before FT)", "GSM8K NLL": fmt(base("gsm8k_nll")),
             "source NLL": fmt(base("source_nll")),
             "source acc %": fmt(base("source_acc"), True)}]
    for m in gnames:
        d = lambda k: np.subtract(per("gsm8k", m, k), per("gsm8k", "full", k))  # noqa: E731
        rows.append({"method": m, "train loss": fmt(per("gsm8k", m, "train_loss")),
                     "GSM8K NLL": fmt(per("gsm8k", m, "gsm8k_nll")),
                     "Δ GSM8K NLL vs full": "-" if m == "full" else fmt(d("gsm8k_nll"), sign=True),
                     "source NLL": fmt(per("gsm8k", m, "source_nll")),
                     "Δ source NLL vs full": "-" if m == "full" else fmt(d("source_nll"),
                                                                         sign=True),
                     "source acc %": fmt(per("gsm8k", m, "source_acc"), True),
                     "step ms": fmt(per("gsm8k", m, "step_ms"), digits=0)})
    text += report.table(rows, ["method", "train loss", "GSM8K NLL", "Δ GSM8K NLL vs full",
                                "source NLL", "Δ source NLL vs full", "source acc %", "step ms"])
    return text


def pairs_table(results, seeds, names, rank) -> str:
    """Paired per-seed differences for the comparisons the papers make: LIFT against LoRA
    (same trainable count at rank r) and LT-SFT (same density), the largest LIFT budget against
    LoRA r, and HFT against full FT."""
    lifts = sorted((n for n in names if n.startswith("lift_r")), key=lambda n: int(n[6:]))
    pairs = [(f"lift_r{rank}", f"lora_r{rank}"), (f"lift_r{rank}", "lt_sft")]
    if lifts and lifts[-1] != f"lift_r{rank}":
        pairs.append((lifts[-1], f"lora_r{rank}"))
    pairs.append(("hft", "full"))
    rows = []
    for part in [p for p in ("arith", "gsm8k") if p in results[seeds[0]]]:
        key = "target_id_nll" if part == "arith" else "gsm8k_nll"
        have = results[seeds[0]][part]
        for a, b in pairs:
            if a not in have or b not in have:
                continue
            d = lambda k: [results[s][part][a][k] - results[s][part][b][k]  # noqa: E731
                           for s in seeds]
            rows.append({"task": "arithmetic" if part == "arith" else "GSM8K-small",
                         "comparison": f"{a} − {b}",
                         "Δ target NLL": fmt(d(key), sign=True),
                         "Δ source NLL (forgetting)": fmt(d("source_nll"), sign=True),
                         "per seed (target; source)": "; ".join(
                             f"{x:+.3f}, {y:+.3f}" for x, y in zip(d(key), d("source_nll")))})
    if not rows:
        return ""
    return ("\n## Paired comparisons (first − second, per seed)\n\n"
            "Negative = the first method lower (learns the target better / forgets the source "
            "less). Target NLL: ID for arithmetic, held-out GSM8K for GSM8K-small.\n\n"
            + report.table(rows))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(results, key=int)
    parts = [p for p in ("arith", "gsm8k") if p in results[seeds[0]]]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts):
        key = "target_id_nll" if part == "arith" else "gsm8k_nll"
        for m in results[seeds[0]][part]:
            x = [results[s][part][m][key] for s in seeds]
            y = [results[s][part][m]["source_nll"] - results[s]["base"]["source_nll"]
                 for s in seeds]
            (mx, hx), (my, hy) = ci95(x), ci95(y)
            ax.errorbar(mx, my, xerr=np.nan_to_num(hx), yerr=np.nan_to_num(hy), fmt="o",
                        capsize=3, label=m)
            ax.annotate(m, (mx, my), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(("target (mul, ID)" if part == "arith" else "GSM8K") +
                      " held-out NLL (lower = learned more)")
        ax.set_ylabel("source (addsub) NLL rise (higher = forgot more)")
        ax.set_title(f"{'arithmetic' if part == 'arith' else 'GSM8K-small'}: "
                     "learning vs forgetting (mean ± 95% CI)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def time_only(args, out):
    """Median step time per method; each round runs 10 steps of every method in turn, so that
    load from other processes hits all methods alike."""
    with tempfile.TemporaryDirectory() as tmp:
        recs = task_records(args, 0)
        tr = write_jsonl(pathlib.Path(tmp) / "t.jsonl", recs["target_train"])
        ev = write_jsonl(pathlib.Path(tmp) / "e.jsonl", recs["target_id"])
        cfg0 = make_config(args, train_path=tr, eval_path=ev, steps=args.steps, seed=0)
        density = lift_density(args, cfg0)
        runs = {}
        for name, sp in methods(args, density).items():
            cfg = cfg0.copy_and_resolve_references()
            cfg.sparsity = sp
            exp = build(cfg)
            fn = jit_steps(exp.train_step(), 1, exp.state_shardings, exp.bank_shardings)
            state = exp.init_state()
            state, _ = fn(state, exp.bank)  # compile
            jax.block_until_ready(state.params)
            runs[name] = [exp, fn, state, []]
    for _ in range(args.rounds):
        for name, r in runs.items():
            exp, fn, state, times = r
            for _ in range(10):
                t = time.perf_counter()
                state, _ = fn(state, exp.bank)
                jax.block_until_ready(state.params)
                times.append(time.perf_counter() - t)
            r[2] = state
    lines = ["| method | step ms (median) | p10-p90 ms |", "|---|---|---|"]
    for name, (_, _, _, times) in runs.items():
        ms = 1e3 * np.array(times)
        lines.append(f"| {name} | {np.median(ms):.1f} | {np.percentile(ms, 10):.1f}-"
                     f"{np.percentile(ms, 90):.1f} |")
    head = report.header("Parameter selection: interleaved step time (`--time-only`)", {
        "setup": f"{args.rounds} rounds x 10 steps per method, methods round-robin, arithmetic "
                 f"target task, batch {args.batch_size}"})
    (out / "sparsity_timing.md").write_text(head + "\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

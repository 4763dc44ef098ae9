"""How much backward work CCE's gradient filter skips on the fused-loss bench inputs, and its error.

    python experiments/grad_filter.py [--rows 1024] [--shapes NxDxV,...] [--out experiments/results/grad_filter.md]

Apple's Cut Cross-Entropy (``linear_cross_entropy(..., filter_eps="auto")``, its default) skips
the ``d_E`` / ``d_C`` GEMM work of every ``[BLOCK_B, BLOCK_V]`` backward tile in which all of
``|softmax - onehot| < eps``, with ``eps = finfo(bf16).eps / 32 = 2**-12``, and its untuned default
tile is 128 x 128.  The tile's logits are still computed; only the two update GEMMs (two thirds of
the backward's FLOPs) are skipped.  So "no slower than CCE" in ``fused_loss.md`` compares our exact
backward with one that does a fraction of the work -- this script measures that fraction.

Inputs are drawn exactly as ``bench_fused_loss.py`` draws them (``h, W ~ N(0, 1) / d**0.25`` in
bf16, so logits are ~N(0, 1); uniform random targets), and the same logits times 0.5 and 2 to
show how strongly the skipped share depends on the logit distribution.  Rows are i.i.d., so the
first ``--rows`` rows (whole 128-row tiles) of each shape are enough; the full vocabulary is used.  Errors are float32 norms over those rows:
``d_hidden`` per row and these rows' contribution to ``d_W``, for the mean-CE loss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = ((8192, 2048, 128256), (16384, 1536, 151936))  # bench_fused_loss.SHAPES
EPS = 2.0**-12
TILES = ((128, 128), (128, 256), (64, 128), (64, 64))


def _stats(rows, d, v, scale, seed=0):
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(seed), 3)
    h = (jax.random.normal(k[0], (rows, d)) / d**0.25).astype(jnp.bfloat16).astype(jnp.float32)
    w = (jax.random.normal(k[1], (d, v)) / d**0.25).astype(jnp.bfloat16).astype(jnp.float32)
    t = jax.random.randint(k[2], (rows,), 0, v)

    @jax.jit
    def run(h, w, t):
        z = scale * (h @ w)
        g = jax.nn.softmax(z, axis=-1) - jax.nn.one_hot(t, v)  # d(sum CE)/dz; CCE's filter input
        out = {}
        for bb, bv in TILES:
            vp = -(-v // bv) * bv  # pad the vocab to whole tiles; padded columns never block a skip
            a = jnp.pad(jnp.abs(g), ((0, 0), (0, vp - v))).reshape(rows // bb, bb, vp // bv, bv)
            keep = (a >= EPS).any(axis=(1, 3))  # [row tiles, vocab tiles]
            gf = jnp.where(jnp.repeat(jnp.repeat(keep, bb, 0), bv, 1)[:, :v], g, 0.0)
            dh, dhf = g @ w.T, gf @ w.T
            dw, dwf = h.T @ g, h.T @ gf
            out[(bb, bv)] = dict(
                skipped=1.0 - keep.mean(),
                err_dh=jnp.linalg.norm(dhf - dh) / jnp.linalg.norm(dh),
                err_dw=jnp.linalg.norm(dwf - dw) / jnp.linalg.norm(dw),
            )
        return out

    return jax.device_get(run(h, w, t))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1024, help="rows per shape (a multiple of 128)")
    ap.add_argument("--scales", default="0.5,1,2", help="logit scales (1 = the bench's inputs)")
    ap.add_argument("--shapes", default=None, help="comma list NxDxV (default: the bench's two)")
    ap.add_argument("--out", default="experiments/results/grad_filter.md")
    args = ap.parse_args()
    if args.rows % 128:
        raise SystemExit(f"--rows must be a multiple of 128 (whole tiles), got {args.rows}")
    shapes = (SHAPES if args.shapes is None else
              [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")])
    import report

    rows = []
    for n, d, v in shapes:
        for scale in (float(s) for s in args.scales.split(",")):
            for (bb, bv), s in _stats(args.rows, d, v, scale).items():
                rows.append({"N x d x V": f"{n}x{d}x{v}", "logit scale": scale, "tile": f"{bb}x{bv}",
                             "tiles skipped": f"{100 * s['skipped']:.1f}%",
                             "rel. err d_hidden": f"{s['err_dh']:.2e}", "rel. err d_W": f"{s['err_dw']:.2e}"})
    text = report.header("CCE-style gradient filtering on the fused-loss bench inputs", {
        "rule": "skip a tile's update GEMMs when all |softmax - onehot| < 2**-12 (CCE filter_eps='auto', bf16)",
        "sample": f"first {args.rows} rows of each shape, full vocabulary, float32",
    }) + "\n" + report.table(rows) + (
        "\n128x128 is CCE's default backward tile; `pallas_gpu` filters its dlogits tiles: 128x256 with\n"
        "one row group, 64x128 with `bwd_rows=\"auto\"` on both bench shapes.  `tiles skipped` is the\n"
        "share of the backward's update-GEMM work left out on these inputs; logit scale 1 is what\n"
        "`bench_fused_loss.py` feeds every implementation.\n")
    report.write(args.out, text)


if __name__ == "__main__":
    main()

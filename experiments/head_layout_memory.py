"""Memory of the LM-head gradient for a tied embedding: transposed copy vs in-place ``[V, d]``.

    python experiments/head_layout_memory.py [--out experiments/results/head_layout_memory.md]

Compiles ``jax.grad`` of the summed target log-probs w.r.t. (hidden, embedding) for a tied head
(float32 embedding ``[V, d]``, bf16 activations) three ways and reports XLA's temp bytes:

- ``embed.T`` cast to bf16, ``weight_layout="dv"``: what the steps did before this change;
- ``embed.T`` in float32, ``"dv"``: the kernels cast tiles, but the transpose is still a copy;
- ``embed`` as stored, ``"vd"``: what ``Transformer.head_weight()`` hands the steps now.

On CPU only ``xla_chunked`` compiles; a Pallas custom call needs its operand materialized just
the same, so the transposed copy is at least as large there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = ((2048, 512, 32000), (4096, 2048, 128256))  # small_50m-like; Llama-3.2-1B head


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/results/head_layout_memory.md")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    import report
    from curriculax.kernels import fused_lm_head

    variants = (("embed.T -> bf16, dv", "dv", True), ("embed.T (f32), dv", "dv", False),
                ("embed as stored, vd", "vd", False))
    rows = []
    for n, d, v in SHAPES:
        shapes = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((v, d), jnp.float32),
                  jax.ShapeDtypeStruct((n,), jnp.int32))
        for name, layout, cast in variants:

            def grads(h, emb, t, layout=layout, cast=cast):
                def loss(h_, e_):
                    w = e_.T if layout == "dv" else e_
                    w = w.astype(jnp.bfloat16) if cast else w
                    return fused_lm_head(h_, w, t, impl="xla_chunked", weight_layout=layout).target_logprob.sum()
                return jax.grad(loss, argnums=(0, 1))(h, emb)

            mem = jax.jit(grads).lower(*shapes).compile().memory_analysis()
            rows.append({"N x d x V": f"{n}x{d}x{v}", "head passed as": name,
                         "temp MiB": round(mem.temp_size_in_bytes / 2**20, 1),
                         "V*d*4 MiB": round(v * d * 4 / 2**20, 1)})
            print(rows[-1], flush=True)
    text = report.header("LM-head gradient memory for a tied embedding (xla_chunked, compiled temp bytes)",
                         {"inputs": "bf16 hidden [N, d], float32 embedding [V, d]"})
    report.write(args.out, text + "\n" + report.table(rows) + "\n")


if __name__ == "__main__":
    main()

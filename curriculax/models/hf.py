"""Hugging Face checkpoints (Llama, Qwen2, Qwen3 safetensors) <-> :class:`Transformer`.

Only ``numpy``, ``ml_dtypes`` and ``safetensors`` are used: no torch / transformers import.

Weight mapping. HF stores every ``nn.Linear`` weight as ``[out, in]`` and computes
``y = x @ W.T``; we store ``[in, ...out]`` and compute ``x @ W``, so every projection is
transposed. Attention projections keep their head axis explicit here (``q: [d,H,D]``,
``o: [H,D,d]``), so after the transpose the flat ``H*D`` axis is reshaped into ``(H, D)``:
HF splits it head-major (``.view(..., -1, head_dim)``), which is exactly a C-order reshape.

======================================  ====================================  ==========
ours (``nnx.state`` path)               HF tensor                             transform
======================================  ====================================  ==========
``embed [V,d]``                         ``model.embed_tokens.weight [V,d]``   copy
``final_norm/scale [d]``                ``model.norm.weight``                 copy
``layers/i/attn/{q,k,v} [d,H|K,D]``     ``...self_attn.{q,k,v}_proj.weight``  ``W.T`` + reshape
``layers/i/attn/o [H,D,d]``             ``...self_attn.o_proj.weight [d,HD]`` ``W.T`` + reshape
``layers/i/attn/{q,k,v}_bias [H|K,D]``  ``...self_attn.{q,k,v}_proj.bias``    reshape (Qwen2)
``layers/i/attn/{q,k}_norm/scale [D]``  ``...self_attn.{q,k}_norm.weight``    copy (Qwen3)
``layers/i/{attn,mlp}_norm/scale``      ``...{input,post_attention}_layernorm.weight``  copy
``layers/i/mlp/{gate,up,down}``         ``...mlp.{gate,up,down}_proj.weight`` ``W.T``
``lm_head [d,V]``                       ``lm_head.weight [V,d]``              ``W.T`` (untied only)
======================================  ====================================  ==========

RoPE needs no conversion: HF Llama/Qwen use the same rotate-half pairing as
:func:`curriculax.models.layers.apply_rope`, and ``inv_freq`` is derived from the config.

Checkpoint strictness: missing tensors, shape mismatches and *unexpected* tensors are all
errors (one :class:`CheckpointError` listing every problem). Extra tensors usually mean a
feature we do not implement (``o_proj.bias``, ``mlp_bias``...), and silently dropping them
would give a model that loads fine but computes something else. The only tensors ignored are
``rotary_emb.inv_freq`` buffers and ``lm_head.weight`` when embeddings are tied.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from curriculax.models.config import ModelConfig, RopeScaling
from curriculax.models.transformer import Transformer

ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# What AutoTokenizer and generate read from a model folder (save_hf's ``tokenizer=``)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
# safetensors' numpy backend cannot build these (numpy has no such dtypes): decoded via ml_dtypes.
_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
               "F8_E5M2": ml_dtypes.float8_e5m2}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; lists every missing/unexpected/misshapen tensor."""


# Config ----------------------------------------------------------------------------------------

def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"Unsupported dtype {dtype!r}; expected float32, bfloat16 or float16.")
    return name


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x: `rope_theta` + `rope_scaling`.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope = rope.get("full_attention", rope)  # nested per layer type (all are full attention)
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"RoPE type {kind!r} is not supported; only 'default' and 'llama3'.")
    return theta, RopeScaling(
        factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(
            rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))),
    )


def config_from_hf(hf: dict) -> ModelConfig:
    """Maps a HF ``config.json`` dict (transformers 4.x or 5.x layout) to a :class:`ModelConfig`."""
    names = list(hf.get("architectures") or [])
    arch = next((a for a in names if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"Unsupported architecture {names or hf.get('model_type')!r}; supported: "
                         f"{sorted(ARCHITECTURES)}.")
    family = ARCHITECTURES[arch]
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"]
    if missing := [k for k in required if k not in hf]:
        raise ValueError(f"{arch} config.json lacks required field(s) {missing}.")
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "mlp_bias": bool(hf.get("mlp_bias")),
        # Llama/Qwen3 attention_bias also adds an o_proj bias, which our attention lacks.
        "attention_bias": family != "qwen2" and bool(hf.get("attention_bias")),
        "use_sliding_window": bool(hf.get("use_sliding_window")),
        "layer_types": any(t != "full_attention" for t in hf.get("layer_types") or []),
    }
    if bad := [f"{k}={hf[k]!r}" for k, v in unsupported.items() if v]:
        raise ValueError(f"{arch} config uses unsupported feature(s): {', '.join(bad)}.")
    theta, scaling = _rope_from_hf(hf)
    heads = hf["num_attention_heads"]
    dtype = _dtype_name(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
        max_seq_len=hf.get("max_position_embeddings", 2048), dtype=dtype, param_dtype=dtype,
    )


def default_architecture(config: ModelConfig) -> str:
    """qk_norm -> Qwen3, qkv_bias -> Qwen2, else Llama."""
    if config.qk_norm:
        return "Qwen3ForCausalLM"
    return "Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"


def check_exportable(config: ModelConfig) -> None:
    """Refuses models with parts a plain HF checkpoint cannot hold (dropping them silently would
    export a model that computes something else)."""
    if config.loramoe_experts:
        raise ValueError(
            "Cannot export a LoRAMoE model (loramoe_experts="
            f"{config.loramoe_experts}) as a Hugging Face checkpoint: its router weights depend "
            "on each token, so the experts cannot be merged into the base weights. Keep the "
            "curriculax checkpoint (or export the base model with loramoe_experts=0).")
    if config.prefix_len:
        raise ValueError(
            f"Cannot export a prefix-tuned model (prefix_len={config.prefix_len}) as a Hugging "
            "Face checkpoint: its learned attention keys/values have no place in the model's "
            "weights. Keep the curriculax checkpoint (or export the base model with prefix_len=0).")


def config_to_hf(config: ModelConfig, architecture: str | None = None) -> dict:
    """A ``config.json`` dict readable by transformers 5.x (``rope_parameters``) and 4.x
    (top-level ``rope_theta`` / ``rope_scaling``). ``dtype`` is the config's ``param_dtype``.
    LoRAMoE and prefix-tuned models are refused (:func:`check_exportable`)."""
    check_exportable(config)
    arch = architecture or default_architecture(config)
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unsupported architecture {arch!r}; supported: {sorted(ARCHITECTURES)}.")
    family = ARCHITECTURES[arch]
    if (config.qkv_bias, config.qk_norm) != (family == "qwen2", family == "qwen3"):
        raise ValueError(f"{arch} cannot express qkv_bias={config.qkv_bias}, "
                         f"qk_norm={config.qk_norm}; use {default_architecture(config)}.")
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if (s := config.rope_scaling) is not None:
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_position_embeddings)
    hf = {
        "architectures": [arch], "model_type": family, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "hidden_act": "silu", "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta, "rope_parameters": rope,
        "rope_scaling": ({k: v for k, v in rope.items() if k != "rope_theta"}
                         if config.rope_scaling is not None else None),
        "attention_dropout": 0.0, "use_cache": True,
        "dtype": config.param_dtype, "torch_dtype": config.param_dtype,
    }
    if family == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None,
                  max_window_layers=config.num_layers)
    else:
        hf.update(attention_bias=False, mlp_bias=False)
    return hf


# Parameter mapping -------------------------------------------------------------------------

def param_map(config: ModelConfig) -> list[tuple[str, str, str]]:
    """``(our flat path, HF tensor name, transform)`` for every parameter of ``config``."""
    out = [("embed", "model.embed_tokens.weight", "copy"),
           ("final_norm/scale", "model.norm.weight", "copy")]
    if not config.tie_embeddings:
        out.append(("lm_head", "lm_head.weight", "linear"))
    for i in range(config.num_layers):
        ours, hf = f"layers/{i}/", f"model.layers.{i}."
        out += [(ours + "attn_norm/scale", hf + "input_layernorm.weight", "copy"),
                (ours + "mlp_norm/scale", hf + "post_attention_layernorm.weight", "copy"),
                (ours + "attn/o", hf + "self_attn.o_proj.weight", "heads_out")]
        for p in "qkv":
            out.append((ours + f"attn/{p}", hf + f"self_attn.{p}_proj.weight", "heads_in"))
            if config.qkv_bias:
                out.append((ours + f"attn/{p}_bias", hf + f"self_attn.{p}_proj.bias", "bias"))
        if config.qk_norm:
            out += [(ours + f"attn/{p}_norm/scale", hf + f"self_attn.{p}_norm.weight", "copy")
                    for p in "qk"]
        out += [(ours + f"mlp/{p}", hf + f"mlp.{p}_proj.weight", "linear")
                for p in ("gate", "up", "down")]
    return out


def _hf_shape(kind: str, s: tuple) -> tuple:
    """HF shape of a tensor whose shape on our side is ``s``."""
    return {"copy": s, "linear": s[::-1], "bias": (int(np.prod(s)),),
            "heads_in": (int(np.prod(s[1:])), s[0]),  # [d,H,D] <- [H*D, d]
            "heads_out": (s[-1], int(np.prod(s[:-1])))}[kind]  # [H,D,d] <- [d, H*D]


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "heads_in":  # [d,H,D] -> [d,H*D] -> [H*D,d]
        w = w.reshape(w.shape[0], -1).T
    elif kind == "heads_out":  # [H,D,d] -> [H*D,d] -> [d,H*D]
        w = w.reshape(-1, w.shape[-1]).T
    elif kind == "linear":
        w = w.T
    elif kind == "bias":
        w = w.reshape(-1)
    return np.ascontiguousarray(w)  # safetensors writes raw buffers: views must be materialized


def _from_hf(kind: str, w: np.ndarray, shape: tuple) -> np.ndarray:
    return (w.T if kind in ("linear", "heads_in", "heads_out") else w).reshape(shape)


def _abstract_model(config: ModelConfig):
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def _param_shapes(config: ModelConfig) -> dict[str, tuple]:
    state = nnx.state(_abstract_model(config), nnx.Param)
    return {"/".join(map(str, p)): tuple(v.get_value().shape) for p, v in state.flat_state()}


def state_to_hf(model, params: Mapping | None = None) -> dict[str, np.ndarray]:
    """HF-named numpy tensors (in the parameters' own dtype) from ``model``'s parameters, or from
    ``params`` (flat ``{"layers/0/attn/q": array}``, e.g. LoRA-merged weights) when given."""
    if params is None:
        state = nnx.state(model, nnx.Param)
        params = {"/".join(map(str, p)): v.get_value() for p, v in state.flat_state()}
    return {hf: _to_hf(kind, np.asarray(params[ours]))
            for ours, hf, kind in param_map(model.config)}


def check_tensors(tensors: Mapping, config: ModelConfig) -> list[tuple[str, str, str]]:
    """The ``(our path, HF name, kind)`` table of ``config`` after checking that ``tensors``
    (names and shapes only) match it; all problems are raised together as one
    :class:`CheckpointError`."""
    shapes = tensors.shapes() if isinstance(tensors, _Checkpoint) else {
        k: tuple(np.shape(v)) for k, v in tensors.items()}
    ours = _param_shapes(config)
    table = param_map(config)
    if unmapped := sorted(set(ours) - {path for path, _, _ in table}):
        raise NotImplementedError(f"No HF name for model parameter(s) {unmapped}.")
    wanted = {hf for _, hf, _ in table}
    ignored = {n for n in shapes if n.endswith("rotary_emb.inv_freq")
               or (config.tie_embeddings and n == "lm_head.weight")}
    problems = []
    if missing := [hf for hf in wanted if hf not in shapes]:
        problems.append(f"missing tensor(s): {_names(missing)}")
    if extra := sorted(set(shapes) - wanted - ignored):
        problems.append(f"unexpected tensor(s) (unsupported feature or wrong architecture): "
                        f"{_names(extra)}")
    bad = [f"shape mismatch for {hf}: expected {exp}, found {tuple(shapes[hf])}"
           for path, hf, kind in table
           if hf in shapes and tuple(shapes[hf]) != (exp := _hf_shape(kind, ours[path]))]
    problems += bad[:10] + [f"... and {len(bad) - 10} more shape mismatches"] * (len(bad) > 10)
    if problems:
        raise CheckpointError("Checkpoint does not match the model config:\n  "
                              + "\n  ".join(problems))
    return table


def hf_to_state(tensors: Mapping, config: ModelConfig) -> dict[str, np.ndarray]:
    """Flat ``{our path: array}`` (cast to ``config.param_dtype``) from HF-named ``tensors``.

    Everything is checked before any data is converted (:func:`check_tensors`).
    """
    table = check_tensors(tensors, config)
    ours, dtype = _param_shapes(config), jnp.dtype(config.param_dtype)
    return {path: _from_hf(kind, np.asarray(tensors[hf]), ours[path]).astype(dtype)
            for path, hf, kind in table}


def _names(names, limit=20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# Reading -----------------------------------------------------------------------------------

class _Checkpoint(Mapping):
    """Lazy ``{name: np.ndarray}`` over ``model.safetensors`` or an index-sharded checkpoint."""

    def __init__(self, directory: Path):
        if (directory / SINGLE_FILE).exists():
            files = [directory / SINGLE_FILE]
        elif (directory / INDEX_FILE).exists():
            weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
            files = [directory / f for f in sorted(set(weight_map.values()))]
        else:
            raise FileNotFoundError(f"No {SINGLE_FILE} or {INDEX_FILE} in {directory} (only "
                                    "safetensors checkpoints are supported).")
        self._info, self._headers = {}, {}  # name -> (file, safetensors dtype, shape)
        for file in files:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    self._info[name] = (file, s.get_dtype(), tuple(s.get_shape()))

    def shapes(self) -> dict[str, tuple]:
        return {name: info[2] for name, info in self._info.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        file, dtype, shape = self._info[name]
        if dtype not in _RAW_DTYPES:
            with safe_open(file, framework="numpy") as f:
                return f.get_tensor(name)
        if file not in self._headers:
            self._headers[file] = _header(file)
        header, start = self._headers[file]  # decode bf16/fp8 from the raw little-endian bytes
        begin, end = header[name]["data_offsets"]
        data = np.memmap(file, np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
        return data.view(_RAW_DTYPES[dtype]).reshape(shape)

    def __iter__(self):
        return iter(self._info)

    def __len__(self):
        return len(self._info)


def _header(file: Path) -> tuple[dict, int]:
    """safetensors layout: u64 little-endian header size, JSON header, then the data buffer."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def read_config(path, *, dtype=None, param_dtype=None) -> ModelConfig:
    """The :class:`ModelConfig` of a local HF checkpoint directory (its ``config.json``);
    ``dtype`` (compute) and ``param_dtype`` (storage) default to the checkpoint's ``dtype``."""
    config = config_from_hf(json.loads((Path(path) / "config.json").read_text()))
    return config.replace(dtype=_dtype_name(jnp.dtype(dtype).name) if dtype else config.dtype,
                          param_dtype=_dtype_name(jnp.dtype(param_dtype).name) if param_dtype
                          else config.param_dtype)


def check_hf(path, config: ModelConfig) -> None:
    """Raises :class:`CheckpointError` unless the checkpoint's tensors (read from the safetensors
    headers only) fit ``config``."""
    check_tensors(_Checkpoint(Path(path)), config)


def load_hf_params(path, config: ModelConfig, shardings=None) -> dict:
    """The checkpoint's weights as the model's pure-dict parameters.

    ``shardings``: ``NamedSharding`` per parameter (a pure dict of the same paths, or of a model
    with more parameters, e.g. adapters); each tensor is converted on the host and sent straight
    to its shards (``jax.make_array_from_callback``: every process fills its own devices), one
    tensor at a time, so the full model never sits on one device. None: default device."""
    tensors = _Checkpoint(Path(path))
    table = check_tensors(tensors, config)
    ours, dtype = _param_shapes(config), jnp.dtype(config.param_dtype)
    where = {} if shardings is None else {
        _path(kp): s for kp, s in jax.tree_util.tree_leaves_with_path(shardings)}

    def place(path, hf, kind):
        x = _from_hf(kind, np.asarray(tensors[hf]), ours[path]).astype(dtype)
        if path not in where:
            return jnp.asarray(x)
        return jax.make_array_from_callback(x.shape, where[path], lambda index: x[index])

    flat = {path: place(path, hf, kind) for path, hf, kind in table}
    abstract = nnx.to_pure_dict(nnx.state(_abstract_model(config), nnx.Param))
    return jax.tree_util.tree_map_with_path(lambda kp, _: flat[_path(kp)], abstract)


def _path(key_path) -> str:
    """``layers/0/attn/q`` from a pure-dict key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def load_hf(path, *, dtype=None, param_dtype=None):
    """Loads a local HF checkpoint directory into ``(Transformer, ModelConfig)``.

    ``dtype`` (compute) and ``param_dtype`` (storage) default to the checkpoint's ``dtype``. The
    model is built with ``nnx.eval_shape`` (no random init) and then filled with the tensors.
    Raises :class:`CheckpointError` (missing / unexpected / misshapen tensors, all listed) or
    ``ValueError`` (unsupported architecture or config feature) before any weight is converted.
    """
    path = Path(path)
    config = read_config(path, dtype=dtype, param_dtype=param_dtype)
    params = hf_to_state(_Checkpoint(path), config)
    model = _abstract_model(config)
    for p, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.set_value(jnp.asarray(params.pop("/".join(map(str, p)))))
        elif isinstance(var, nnx.Variable):  # the model state is parameters only (RoPE is derived)
            raise TypeError(f"load_hf does not know how to initialize non-parameter variable {p}.")
    return model, config


# Writing -----------------------------------------------------------------------------------

def _token_ids(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    stops = list(tokenizer.stop_ids)
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops}
    return {k: v for k, v in ids.items() if v is not None}


def _parse_size(size) -> int:
    if size is None:
        return 5 * 10**9  # transformers' default shard size
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"Cannot parse max_shard_size={size!r}; use bytes or e.g. '500MB', '5GB'.")
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
            "GIB": 2**30}[m.group(2)]
    return int(float(m.group(1)) * unit)


def save_hf(model, config: ModelConfig, path, *, architecture: str | None = None,
            max_shard_size=None, extra_config: dict | None = None, tokenizer=None) -> Path:
    """Writes ``config.json`` + safetensors weights loadable by
    ``transformers.AutoModelForCausalLM.from_pretrained(path)``.

    Tensors are written in ``config.param_dtype``. Weights above ``max_shard_size`` (bytes or
    '500MB'-style, default 5GB) are split into ``model-0000i-of-0000n.safetensors`` plus an index.
    ``tokenizer`` (``exp.tokenizer``) writes its ``bos_token_id`` / ``eos_token_id`` (every stop
    id) into config.json and, for a Hugging Face tokenizer, copies its files
    (:data:`TOKENIZER_FILES`), so the folder also loads with ``AutoTokenizer`` and ``generate``
    stops where curriculax's does. ``extra_config`` is merged into config.json last.
    Everything is written to a temporary sibling directory first: a fresh ``path`` appears by one
    atomic rename; an existing directory gets its files replaced (``os.replace``) only after all
    were written, keeping unrelated files (tokenizer) and deleting stale weight shards.
    """
    check_exportable(model.config)
    loose = dict(dtype="float32", param_dtype="float32", remat=False, max_seq_len=0)
    if config.replace(**loose) != model.config.replace(**loose):
        raise ValueError(f"save_hf: config {config} does not describe the model ({model.config}).")
    hf_config = {**config_to_hf(config, architecture), **_token_ids(tokenizer), **(extra_config or {})}
    folder = Path(tokenizer.path).parent if getattr(tokenizer, "path", None) else None
    dtype = jnp.dtype(config.param_dtype)
    tensors = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in state_to_hf(model).items()}
    limit, shards, size = _parse_size(max_shard_size), [{}], 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the checkpoint should be readable
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        for name in TOKENIZER_FILES if folder is not None else ():
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                     "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if not path.exists():
            os.rename(tmp, path)
            return path
        if not path.is_dir():
            raise FileExistsError(f"save_hf target {path} exists and is not a directory.")
        new = {f.name for f in tmp.iterdir()}
        for f in sorted(tmp.iterdir()):
            os.replace(f, path / f.name)
        for f in path.iterdir():
            stale_weights = f.name == INDEX_FILE or re.fullmatch(r"model.*\.safetensors", f.name)
            if f.name not in new and stale_weights:
                f.unlink()
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

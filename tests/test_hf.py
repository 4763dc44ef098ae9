"""HF checkpoint import/export parity against tiny random `transformers` models (CPU, fp32)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from curriculax.models import generate, load_hf, save_hf  # noqa: E402
from curriculax.models import hf as hfmod  # noqa: E402
from curriculax.models.config import ModelConfig, RopeScaling  # noqa: E402

torch.set_num_threads(1)
V, TOL, NEW_TOKENS = 128, 1e-4, 16
FAMILIES = ["llama", "qwen2", "qwen3"]
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, attn_implementation="eager", bos_token_id=None,
              eos_token_id=None, pad_token_id=0)


def make_hf_model(family: str, seed: int = 0):
    """Tiny random HF model whose every weight matters (biases, norms ~ 1 + noise)."""
    if family == "llama":  # llama3 rope scaling whose 3 frequency bands all occur; tied embeddings
        rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=32)
        cfg = transformers.LlamaConfig(**COMMON, head_dim=16, rope_parameters=rope,
                                       tie_word_embeddings=True)
    elif family == "qwen2":  # q/k/v biases, untied head
        cfg = transformers.Qwen2Config(**COMMON, rope_parameters=dict(rope_type="default",
                                       rope_theta=1e6), tie_word_embeddings=False)
    else:  # q/k norms; head_dim (32) != hidden/heads (16) as in real Qwen3
        cfg = transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False,
                                       rope_parameters=dict(rope_type="default", rope_theta=1e4))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def padded_batch(seed=1, lengths=(16, 13, 7)):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = np.zeros((len(lengths), t), np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):  # left padding, real tokens never equal to pad (0)
        tokens[i, t - n:] = rng.integers(1, V, n)
        mask[i, t - n:] = 1
    return tokens, mask


def hf_logits(model, tokens, mask):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def our_logits(model, tokens, mask):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    hidden = model(jnp.asarray(tokens, jnp.int32), positions=jnp.asarray(positions),
                   segment_ids=jnp.asarray(mask))
    return np.asarray(model.logits(hidden))


def max_real_diff(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.fixture(scope="module", params=FAMILIES)
def family_ckpt(request, tmp_path_factory):
    family = request.param
    hf_model = make_hf_model(family)
    path = tmp_path_factory.mktemp(family)
    hf_model.save_pretrained(path)
    tokens, mask = padded_batch()
    return family, hf_model, path, hf_logits(hf_model, tokens, mask)


def test_config_switches(family_ckpt):
    family, hf_model, path, _ = family_ckpt
    cfg = hfmod.config_from_hf(json.loads((path / "config.json").read_text()))
    assert (cfg.qkv_bias, cfg.qk_norm) == (family == "qwen2", family == "qwen3")
    assert cfg.tie_embeddings == (family == "llama")
    assert cfg.head_dim == (32 if family == "qwen3" else 16)
    assert cfg.num_kv_heads == 2 and cfg.num_heads == 4 and cfg.dtype == "float32"
    if family == "llama":
        assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 32)
    else:
        assert cfg.rope_scaling is None
    assert cfg.rope_theta == {"llama": 1e4, "qwen2": 1e6, "qwen3": 1e4}[family]
    # and back: config_to_hf -> config_from_hf is the identity
    assert hfmod.config_from_hf(hfmod.config_to_hf(cfg)) == cfg


def test_logits_parity_padded(family_ckpt):
    family, _, path, ref = family_ckpt
    model, cfg = load_hf(path)
    tokens, mask = padded_batch()
    diff = max_real_diff(our_logits(model, tokens, mask), ref, mask)
    print(f"{family}: load_hf logits max|diff| = {diff:.2e}")
    assert diff <= TOL
    assert np.abs(ref[mask.astype(bool)]).max() > 0.5  # not a degenerate model


def test_save_hf_roundtrip_into_transformers(family_ckpt, tmp_path):
    family, hf_model, path, ref = family_ckpt
    model, cfg = load_hf(path)
    out = save_hf(model, cfg, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                             dtype=torch.float32).eval()
    assert type(back) is type(hf_model)
    orig_sd, back_sd = hf_model.state_dict(), back.state_dict()
    assert sorted(orig_sd) == sorted(back_sd)
    for k in orig_sd:  # exact fp32 round trip
        assert torch.equal(orig_sd[k], back_sd[k]), k
    tokens, mask = padded_batch()
    diff = max_real_diff(hf_logits(back, tokens, mask), ref, mask)
    print(f"{family}: save_hf -> transformers logits max|diff| = {diff:.2e}")
    assert diff <= TOL


def test_greedy_generate_matches_transformers(family_ckpt):
    family, hf_model, path, _ = family_ckpt
    model, _ = load_hf(path)
    tokens, mask = padded_batch(seed=2, lengths=(12, 5))
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)
    ref = ref[:, tokens.shape[1]:].numpy()
    ours = np.asarray(generate(model, tokens, NEW_TOKENS, pad_id=0, prompt_mask=mask))
    assert ref.shape == ours.shape == (2, NEW_TOKENS)
    for row in range(2):
        np.testing.assert_array_equal(ours[row], ref[row], err_msg=f"{family} row {row}")


def test_greedy_generate_right_padded_matches_transformers(family_ckpt):
    """Right-padded prompts (mask given) decode as the left-padded ones transformers decodes."""
    family, hf_model, path, _ = family_ckpt
    model, _ = load_hf(path)
    tokens, mask = padded_batch(seed=2, lengths=(12, 5, 9))
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)
    ref = ref[:, tokens.shape[1]:].numpy()
    right, rmask = np.zeros_like(tokens), np.zeros_like(mask)
    for i, n in enumerate(mask.sum(1)):
        right[i, :n], rmask[i, :n] = tokens[i, -n:], 1
    ours = np.asarray(generate(model, right, NEW_TOKENS, pad_id=0, prompt_mask=rmask))
    np.testing.assert_array_equal(ours, ref, err_msg=family)


def test_sharded_checkpoints(tmp_path):
    hf_model = make_hf_model("qwen2", seed=3)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / hfmod.INDEX_FILE).exists()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    model, cfg = load_hf(tmp_path / "hf")
    tokens, mask = padded_batch()
    ref = hf_logits(hf_model, tokens, mask)
    assert max_real_diff(our_logits(model, tokens, mask), ref, mask) <= TOL
    # our sharded export loads in transformers too
    out = save_hf(model, cfg, tmp_path / "ours", max_shard_size="40KB")
    index = json.loads((out / hfmod.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert max_real_diff(hf_logits(back.float().eval(), tokens, mask), ref, mask) <= TOL


def test_bf16_checkpoint_loads(tmp_path):
    hf_model = make_hf_model("qwen3", seed=4).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path)
    model, cfg = load_hf(tmp_path)
    assert cfg.param_dtype == cfg.dtype == "bfloat16"
    ours = hfmod.state_to_hf(model)
    for name, t in hf_model.state_dict().items():
        assert ours[name].dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(ours[name].astype(np.float32), t.float().numpy(), name)
    model32, cfg32 = load_hf(tmp_path, dtype="float32", param_dtype=jnp.float32)
    assert cfg32.param_dtype == "float32" and model32.embed[...].dtype == jnp.float32
    # fp32 model exported as bf16 (tensors cast to config.param_dtype) -> same bf16 weights
    out = save_hf(model32, cfg32.replace(param_dtype="bfloat16"), tmp_path / "bf16")
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert back.dtype == torch.bfloat16
    for name, t in hf_model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


# Errors ----------------------------------------------------------------------------------------

def _edit_checkpoint(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def qwen2_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_err")
    make_hf_model("qwen2", seed=5).save_pretrained(path)
    return path


def test_unknown_architecture(qwen2_ckpt, tmp_path):
    cfg = json.loads((qwen2_ckpt / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MistralForCausalLM") as err:
        load_hf(tmp_path)
    assert "Qwen3ForCausalLM" in str(err.value)  # lists the supported ones


def test_missing_tensor(qwen2_ckpt, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = _edit_checkpoint(qwen2_ckpt, tmp_path / "c", lambda t: t.pop(name))
    with pytest.raises(hfmod.CheckpointError, match="missing") as err:
        load_hf(path)
    assert name in str(err.value) and "shape" not in str(err.value)


def test_shape_mismatch(qwen2_ckpt, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    path = _edit_checkpoint(qwen2_ckpt, tmp_path / "c",
                            lambda t: t.update({name: np.zeros((48, 64), np.float32)}))
    with pytest.raises(hfmod.CheckpointError) as err:
        load_hf(path)
    msg = str(err.value)
    assert name in msg and "(32, 64)" in msg and "(48, 64)" in msg and "missing" not in msg


def test_unexpected_tensor_is_error_but_inv_freq_is_ignored(qwen2_ckpt, tmp_path):
    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
        t["model.layers.0.self_attn.o_proj.bias"] = np.ones(64, np.float32)
    path = _edit_checkpoint(qwen2_ckpt, tmp_path / "c", add)
    with pytest.raises(hfmod.CheckpointError, match="o_proj.bias") as err:
        load_hf(path)
    assert "inv_freq" not in str(err.value)


def test_config_errors_and_legacy_layout():
    legacy = {  # transformers 4.x layout: top-level rope_theta, rope_scaling, torch_dtype
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True, "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }
    assert hfmod.config_from_hf(legacy) == ModelConfig.llama3_2_1b()
    qwen25 = {  # Qwen2.5-0.5B's config.json (no head_dim, inactive sliding window)
        "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 896,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "vocab_size": 151936,
    }
    assert hfmod.config_from_hf(qwen25) == ModelConfig.qwen2_5_0_5b()
    qwen3 = {  # Qwen3-0.6B's config.json (head_dim 128 != 1024 / 16)
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936,
    }
    assert hfmod.config_from_hf(qwen3) == ModelConfig.qwen3_0_6b()
    with pytest.raises(ValueError, match="use_sliding_window"):
        hfmod.config_from_hf({**qwen25, "use_sliding_window": True})
    with pytest.raises(ValueError, match="yarn"):
        hfmod.config_from_hf({**legacy, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="attention_bias"):
        hfmod.config_from_hf({**legacy, "attention_bias": True})
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        hfmod.config_to_hf(ModelConfig.tiny(), "Qwen2ForCausalLM")  # no qkv_bias


def test_save_is_atomic_and_overwrite_keeps_other_files(qwen2_ckpt, tmp_path, monkeypatch):
    model, cfg = load_hf(qwen2_ckpt)
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="does not describe the model"):
        save_hf(model, cfg.replace(num_layers=1), target)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(hfmod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, cfg, target)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp dir
    monkeypatch.undo()

    save_hf(model, cfg, target, max_shard_size="40KB")  # sharded first
    (target / "tokenizer.json").write_text("{}")
    save_hf(model, cfg, target)  # then overwrite with a single file
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

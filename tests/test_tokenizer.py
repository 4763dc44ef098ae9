"""Tests for curriculax.data.tokenizer, checked against transformers on local files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curriculax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

# Qwen2.5-like ChatML template: '-' whitespace control, a default system
# message, raise_exception, and one part relying on trim_blocks/lstrip_blocks.
QWEN_TEMPLATE = (
    "{% for message in messages %}\n"
    "    {% if loop.first and messages[0]['role'] != 'system' %}\n"
    "<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n"
    "    {% endif %}\n"
    "    {%- if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "        {{- raise_exception('unknown role ' + message['role']) }}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tom has 12 apples. He gets 5 more, then gives away 3.",
    "12 + 5 = 17\n17 - 3 = 14\n#### 14",
    "Grüße aus Köln! 数学は楽しい。 Ünïcödé ✓",
    "How many apples does he have? The answer is 14.",
]
CHAT = [{"role": "user", "content": "What is 12 + 5?"}, {"role": "assistant", "content": "17"},
        {"role": "user", "content": "Ünïcödé ✓ and 3 more?"}]


# ---------------------------------------------------------------- ByteTokenizer

def test_byte_roundtrip_and_specials():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
    text = "Grüße, 数学 ✓ 🙂\n#### 14"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids) and len(ids) > len(text)
    assert tok.decode(ids) == text
    specials = (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.unk_id, tok.vocab_size)
    assert specials == (256, 257, 258, 259, 260, 264)
    assert tok.vocab_size % 8 == 0
    wrapped = [tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id, tok.mask_id]
    assert tok.decode(wrapped) == "hi"
    assert tok.decode(wrapped, skip_special=False) == "<bos>hi<eos><pad><mask>"
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a cut multi-byte char does not raise


def test_byte_chat_template():
    tok = ByteTokenizer()
    assert tok.apply_chat_template(CHAT[:1]) == "User: What is 12 + 5?\nAssistant: "
    assert tok.apply_chat_template(CHAT[:2], add_generation_prompt=False) == "User: What is 12 + 5?\nAssistant: 17\n"
    with pytest.raises(ValueError, match="no chat template"):
        ByteTokenizer(chat_template=None).apply_chat_template(CHAT)


# ---------------------------------------------------------------- HFTokenizer on a tiny trained BPE

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS, trainer)
    folder = tmp_path_factory.mktemp("tiny_bpe")
    raw.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "model_max_length": 512, "chat_template": QWEN_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_hf_matches_transformers(hf_dir):
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(hf_dir)
    assert isinstance(ours, HFTokenizer) and isinstance(ours, Tokenizer)
    auto = transformers.AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    texts = [*CORPUS, "unseen wörds 😀 <|im_start|>user\nhi<|im_end|>", ""]
    for text in texts:
        ids = ours.encode(text)
        assert ids == fast.encode(text, add_special_tokens=False) == auto.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == auto.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special=False) == auto.decode(ids, skip_special_tokens=False)
    assert ours.decode(ours.encode(CORPUS[3])) == CORPUS[3]
    assert ours.vocab_size == len(auto) and ours.vocab_size > 256 + len(SPECIALS)
    assert (ours.eos_id, ours.pad_id, ours.bos_id) == (auto.eos_token_id, auto.pad_token_id, None)
    assert ours.eos_id == ours.encode("<|im_end|>")[0] and ours.mask_id is None
    for generation in (True, False):
        for chat in (CHAT, [{"role": "system", "content": "Be brief."}, *CHAT[:1]]):
            expected = auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
            assert ours.apply_chat_template(chat, add_generation_prompt=generation) == expected
    rendered = ours.apply_chat_template(CHAT[:1])
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nWhat is 12 + 5?<|im_end|>\n<|im_start|>assistant\n")
    # the sandbox options matter: a default jinja2 Template renders this template differently
    import jinja2
    assert jinja2.Template(QWEN_TEMPLATE).render(messages=CHAT[:1], add_generation_prompt=True) != rendered


def test_hf_chat_template_raise_exception(hf_dir):
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role tool"):
        load_tokenizer(hf_dir).apply_chat_template([{"role": "tool", "content": "x"}])


def test_hf_special_token_fallbacks(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="no eos token"):  # no config files: no eos anywhere
        load_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path / "tokenizer.json", eos_token="<|im_end|>")
    end_id, text_id, start_id = (tok.encode(t)[0] for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>"))
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (end_id, end_id, None)  # pad falls back to eos
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CHAT)
    # special_tokens_map.json, AddedToken-dict form
    added = {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": added, "bos_token": "<|im_start|>"}))
    tok = load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (text_id, text_id, start_id)
    # config.json ids (a list of eos ids: the first is used), chat_template.jinja file
    (tmp_path / "special_tokens_map.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [end_id, text_id], "pad_token_id": text_id}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ eos_token }}{{ messages[0]['content'] }}")
    tok = load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (end_id, text_id, None)
    assert tok.apply_chat_template(CHAT[:1]) == "<|im_end|>What is 12 + 5?"  # undefined bos renders empty
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HFTokenizer(tmp_path, eos_token="<|nope|>")


def test_load_tokenizer_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path / "no_such_model")
    assert str(tmp_path / "no_such_model") in str(err.value) and "tokenizer.json" in str(err.value)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # exists, but holds no tokenizer.json


def test_chat_template_that_renders_bos_gets_one_bos(hf_dir, tmp_path):
    from curriculax.data.bank import ExampleBank

    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}\n"}  # as Llama-3's does
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    rec = {"id": "a", "prompt": "hi", "response": "#### 1", "answer": "1", "category": "c", "difficulty": 1}
    for template in ("chat", "plain"):
        row = ExampleBank.build([rec], tok, seq_len=32, template=template).bank.tokens[0]
        assert row[0] == tok.bos_id and row[1] != tok.bos_id, template
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>",}')
    with pytest.raises(ValueError, match=r"tokenizer_config.json: invalid JSON .* line 1"):
        load_tokenizer(tmp_path)


def test_explicit_null_bos_is_not_replaced_by_config_json(hf_dir, tmp_path):
    """Qwen2.5 ships ``"bos_token": null`` in tokenizer_config.json and ``bos_token_id``
    (<|endoftext|>) in config.json: transformers adds no BOS, so neither may the bank."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    text_id = load_tokenizer(hf_dir).encode("<|endoftext|>")[0]
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": text_id, "eos_token_id": text_id}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id is None and tok.eos_id == tok.encode("<|im_end|>")[0]
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True).bos_token_id is None


def test_add_bos_token_false_adds_no_bos_to_rows(hf_dir, tmp_path):
    """``"add_bos_token": false`` (a model trained without BOS) is honoured by the bank, as
    transformers' encode honours it; the token itself stays known."""
    from curriculax.data.bank import tokenize_record

    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    rec = {"prompt": "hi", "response": "#### 1"}
    for add, first_is_bos in ((True, True), (False, False)):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {**config, "bos_token": "<|endoftext|>", "add_bos_token": add}))
        tok = load_tokenizer(tmp_path)
        assert tok.bos_id == tok.encode("<|endoftext|>")[0]
        ids, _, _ = tokenize_record(rec, tok, "plain", add_bos=True)
        assert (ids[0] == tok.bos_id) == first_is_bos


def test_unreadable_tokenizer_json_names_the_file(tmp_path):
    """A git-lfs pointer (or config.json) given as the tokenizer used to raise the Rust
    library's bare Exception ("expected value at line 1 column 1"), which the CLI does not catch."""
    file = tmp_path / "tokenizer.json"
    file.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 7031645\n")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a Hugging Face tokenizer file") as err:
        load_tokenizer(tmp_path)
    assert str(file) in str(err.value)


def test_stop_ids_add_the_eos_ids_the_model_configs_list(hf_dir, tmp_path):
    """Llama-3-Instruct's tokenizer names <|end_of_text|> as eos while its generation config
    also stops at <|eot_id|>: eval, rollouts and S3FT stop at every listed id, as transformers'
    generate does (they stopped at eos_id only and read on past the end of the turn)."""
    from curriculax.rl import s3ft

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    base = load_tokenizer(tmp_path)
    eos, text_id, start_id = base.eos_id, base.encode("<|endoftext|>")[0], base.encode("<|im_start|>")[0]
    assert base.stop_ids == (eos,) and ByteTokenizer().stop_ids == (ByteTokenizer().eos_id,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [text_id, eos]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": start_id}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == eos and tok.stop_ids == (eos, text_id, start_id)
    row = [*tok.encode("17"), text_id, *tok.encode(" and on"), eos, 0]
    assert s3ft._text(row, tok, pad_id=0) == "17"


def test_save_hf_with_the_tokenizer_loads_and_stops_in_transformers(hf_dir, tmp_path):
    """An exported folder carries the tokenizer files and the ids generation stops at: before,
    config.json had no eos_token_id and AutoTokenizer found nothing to load."""
    transformers = pytest.importorskip("transformers")
    from flax import nnx

    from curriculax.models import ModelConfig, Transformer, save_hf

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "tok" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "tok" / name).write_bytes((hf_dir / name).read_bytes())
    tok = load_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [tok.eos_id, tok.encode("<|endoftext|>")[0]]}))
    tok = load_tokenizer(tmp_path / "tok")
    cfg = ModelConfig.tiny(vocab_size=tok.vocab_size)
    out = save_hf(Transformer(cfg, rngs=nnx.Rngs(0)), cfg, tmp_path / "export", tokenizer=tok)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == list(tok.stop_ids) and "bos_token_id" not in config
    auto = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert auto.eos_token_id == tok.eos_id and auto("12 + 5")["input_ids"] == tok.encode("12 + 5")
    gen = transformers.GenerationConfig.from_pretrained(str(out))
    assert gen.eos_token_id == list(tok.stop_ids)
    assert load_tokenizer(out).stop_ids == tok.stop_ids

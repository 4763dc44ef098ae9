"""Tokenizers: one small protocol, a byte-level tokenizer and a local HF wrapper.

* :class:`Tokenizer` -- what the rest of curriculax relies on.
* :class:`ByteTokenizer` -- no files needed: ids 0..255 are UTF-8 bytes, then
  ``<pad>`` 256, ``<bos>`` 257, ``<eos>`` 258, ``<mask>`` 259, ``<unk>`` 260;
  ``vocab_size`` 264 (padded to a multiple of 8 for TPU/GPU-friendly tables).
* :class:`HFTokenizer` -- a local Hugging Face ``tokenizer.json`` (via the
  ``tokenizers`` package, no ``transformers`` needed), with the chat template and
  special tokens read from ``tokenizer_config.json`` like ``transformers`` does.
* :func:`load_tokenizer` -- ``"byte"``, a directory or a ``tokenizer.json`` path.

Nothing here downloads anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Message = Mapping[str, Any]


@runtime_checkable
class Tokenizer(Protocol):
    """What curriculax needs from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int
    stop_ids: tuple[int, ...]  # ids that end a generation: eos_id first, then any the model lists
    mask_id: int | None
    chat_template: str | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added."""
        ...

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens dropped when ``skip_special``."""
        ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a chat (``[{"role", "content"}, ...]``) to a prompt string."""
        ...


def render_chat_template(template: str | None, messages: Sequence[Message], *, add_generation_prompt: bool,
                         owner: str = "tokenizer", **special_tokens: Any) -> str:
    """Render a Jinja chat template the way ``transformers`` does.

    Same sandboxed environment (``ImmutableSandboxedEnvironment`` with
    ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a
    non-escaping ``tojson`` filter and a ``raise_exception`` global) and the same
    variables: ``messages``, ``add_generation_prompt`` and the special tokens
    (``bos_token``, ``eos_token``, ...).
    """
    if not template:
        raise ValueError(f"{owner} has no chat template: add a 'chat_template' to tokenizer_config.json "
                         "(or a chat_template.jinja file) or format the prompt yourself")
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **special_tokens)


BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus five specials; vocab padded to 264."""

    SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<mask>", "<unk>")

    def __init__(self, chat_template: str | None = BYTE_CHAT_TEMPLATE) -> None:
        self.pad_id, self.bos_id, self.eos_id, self.mask_id, self.unk_id = range(256, 261)
        self.stop_ids = (self.eos_id,)
        self.vocab_size = 264
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Bytes are decoded as UTF-8 (invalid sequences become U+FFFD);
        specials are dropped or written as ``<pad>`` etc.; ids 261..263 as ``<unk>``."""
        out, buf = [], bytearray()
        for i in (int(i) for i in ids):
            if 0 <= i < 256:
                buf.append(i)
                continue
            if not skip_special:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(self.SPECIALS[i - 256] if 256 <= i < 261 else "<unk>")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    owner="ByteTokenizer", bos_token="<bos>", eos_token="<eos>",
                                    pad_token="<pad>", unk_token="<unk>")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                             f"fix the file or re-save the tokenizer.") from None


def _token_text(value: Any) -> str | None:
    """A special token written as a string or as an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """``chat_template.jinja`` if present, else tokenizer_config's ``chat_template``
    (a string, or a list of ``{"name", "template"}`` of which "default" is used)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class HFTokenizer:
    """A local Hugging Face fast tokenizer (``tokenizer.json``).

    Special tokens (``bos``/``eos``/``pad``/``mask``) come from
    ``tokenizer_config.json``, then ``special_tokens_map.json``, then the ids in
    ``config.json`` (not for a token that tokenizer_config sets to null, as Qwen2 does
    its BOS); ``pad`` falls back to ``eos``.  Explicit keyword arguments
    (token strings) win.  ``vocab_size`` counts added tokens too.  ``add_bos`` follows
    ``add_bos_token`` (default true): whether bank rows start with BOS. ``stop_ids``: ``eos_id``
    and the other eos ids listed in ``generation_config.json`` / ``config.json``.
    """

    def __init__(self, path: str | os.PathLike, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        file = Path(path)
        file = file / "tokenizer.json" if file.is_dir() else file
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file} (expected a Hugging Face tokenizer.json)")
        folder = file.parent
        self.path = file
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as err:  # the Rust library raises a bare Exception without the path
            raise ValueError(f"{file}: not a Hugging Face tokenizer file ({err}); point config.data.tokenizer "
                             "at the model directory or its tokenizer.json (a git-lfs pointer needs "
                             "'git lfs pull').") from None
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        model_config = _read_json(folder / "config.json")
        self.tokens = {kind: explicit or _token_text(config.get(f"{kind}_token"))
                       or _token_text(special_map.get(f"{kind}_token"))
                       for kind, explicit in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token),
                                              ("mask", None), ("unk", None))}
        # An explicit null in tokenizer_config.json means "no such token", as in transformers:
        # Qwen2's "bos_token": null must not turn config.json's bos_token_id into a BOS.
        nulled = {kind for kind in self.tokens if f"{kind}_token" in config and config[f"{kind}_token"] is None}
        ids = {kind: None if text is None and kind in nulled else self._id(kind, text, model_config)
               for kind, text in self.tokens.items()}
        if ids["eos"] is None:
            raise ValueError(f"{file}: no eos token found: set 'eos_token' in {folder / 'tokenizer_config.json'} "
                             "or pass HFTokenizer(..., eos_token=...)")
        if ids["pad"] is None:
            ids["pad"], self.tokens["pad"] = ids["eos"], self.tokens["eos"]
        self.bos_id, self.eos_id, self.pad_id, self.mask_id = ids["bos"], ids["eos"], ids["pad"], ids["mask"]
        # Generation stops at any eos id the model's configs list, as transformers' generate
        # does: Llama-3-Instruct ends turns with <|eot_id|>, Qwen2.5-Instruct with <|im_end|>.
        listed = (_read_json(folder / "generation_config.json").get("eos_token_id"),
                  model_config.get("eos_token_id"))
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *(
            i for x in listed for i in (x if isinstance(x, list) else [x]) if isinstance(i, int))]))
        # Whether rows start with BOS (transformers' add_bos_token; absent means yes, and the
        # bank never doubles a BOS that a chat template already wrote).
        self.add_bos = bool(config.get("add_bos_token", True))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template or _chat_template(folder, config)

    def _id(self, kind: str, text: str | None, model_config: Mapping[str, Any]) -> int | None:
        if text is not None:
            token_id = self._tok.token_to_id(text)
            if token_id is None:
                raise ValueError(f"{self.path}: {kind}_token {text!r} is not in the vocabulary")
            return token_id
        token_id = model_config.get(f"{kind}_token_id")
        if isinstance(token_id, list):  # some configs list several eos ids: the first is canonical
            token_id = token_id[0] if token_id else None
        if isinstance(token_id, int):
            self.tokens[kind] = self._tok.id_to_token(token_id)
            return token_id
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        specials = {f"{kind}_token": text for kind, text in self.tokens.items() if text is not None}
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    owner=f"tokenizer at {self.path.parent}", **specials)


def load_tokenizer(path_or_name: str | os.PathLike, **overrides: Any) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; a directory holding ``tokenizer.json``
    or a ``tokenizer.json`` path -> :class:`HFTokenizer` (``overrides`` such as
    ``eos_token=`` go to its constructor).  Never downloads."""
    if isinstance(path_or_name, str) and path_or_name == "byte":
        return ByteTokenizer(**overrides)
    path = Path(path_or_name)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}: expected 'byte', a directory containing tokenizer.json, "
            f"or the path of a tokenizer.json file ({file} does not exist); nothing is downloaded")
    return HFTokenizer(file, **overrides)

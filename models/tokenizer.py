"""Tokenizers: a HF `tokenizers.Tokenizer` from GGUF metadata or from an HF `tokenizer.json`."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

# llama.cpp token types (llama_token_type in llama.h).
_CONTROL, _USER_DEFINED = 3, 4

# llama.cpp `tokenizer.ggml.pre` names whose split is GPT-2's regex, alone or after "\p{N}".
_GPT2_PRE = ("default", "gpt-2", "mpt", "olmo", "jais")
_DIGITS_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")


def _pre_tokenizer(pre: str, add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    """The split llama.cpp applies for `tokenizer.ggml.pre` (llama-vocab.cpp), as a HF pre-tokenizer."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if pre in _GPT2_PRE:
        return byte_level
    if pre in _DIGITS_GPT2_PRE:
        # llama.cpp splits "\p{N}" first (every digit alone), then runs GPT-2's regex on each piece:
        # exactly the Digits(individual) + ByteLevel pair of these models' own tokenizer.json.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise ValueError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported; supported: "
                     f"{sorted(_GPT2_PRE + _DIGITS_GPT2_PRE)}")


def tokenizer_from_gguf_metadata(md: dict) -> HFTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from `tokenizer.ggml.*` metadata (key -> value).

    Only `tokenizer.ggml.model == "gpt2"` (byte-level BPE) is built; its tokens are already spelled
    in GPT-2's byte alphabet ("Ġ" for a space), so vocab and merges go to BPE unchanged.
    """
    model = md.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported; only 'gpt2' (byte-level BPE)")
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    tok = HFTokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, dropout=None,
                          continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(md.get("tokenizer.ggml.pre", "default"),
                                       bool(md.get("tokenizer.ggml.add_space_prefix", False)))
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|endoftext|>, <|im_start|>, ...) and user-defined ones match whole in text,
    # as in llama.cpp; otherwise BPE would cut them into pieces.
    types = md.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    return tok


class Tokenizer:
    """What the runtime needs from a tokenizer: ids in, text out, and the BOS/EOS ids."""

    def __init__(self, tok: HFTokenizer, bos_id: int | None, eos_id: int | None):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # No post-processor template: BOS is ours to add, so both file kinds behave alike.
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    @classmethod
    def from_gguf_metadata(cls, md: dict) -> "Tokenizer":
        return cls(tokenizer_from_gguf_metadata(md), md.get("tokenizer.ggml.bos_token_id"),
                   md.get("tokenizer.ggml.eos_token_id"))

    @classmethod
    def from_gguf_reader(cls, reader) -> "Tokenizer":
        md = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")}
        return cls.from_gguf_metadata(md)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        from .gguf_loader import open_gguf  # local: keeps `gguf` optional for HF-only users

        return cls.from_gguf_reader(open_gguf(path))

    @classmethod
    def from_hf_dir(cls, path: str | Path, bos_id: int | None = None, eos_id: int | None = None) -> "Tokenizer":
        """`tokenizer.json` of an HF directory; BOS/EOS from tokenizer_config.json's token strings,
        else the given ids (e.g. from config.json)."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer.json not found in {path}")
        tok = HFTokenizer.from_file(str(file))
        tc_file = path / "tokenizer_config.json"
        if tc_file.is_file():
            tc = json.loads(tc_file.read_text())
            bos_id = _token_id(tok, tc.get("bos_token"), bos_id)
            eos_id = _token_id(tok, tc.get("eos_token"), eos_id)
        return cls(tok, bos_id, eos_id)


def _token_id(tok: HFTokenizer, token: str | dict | None, fallback: int | None) -> int | None:
    if isinstance(token, dict):  # older tokenizer_config.json spells AddedToken as a dict
        token = token.get("content")
    tid = tok.token_to_id(token) if token else None
    return fallback if tid is None else tid

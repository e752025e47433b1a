"""Text tokenisers over HF `tokenizers`: WordPiece (BERT / MiniLM) from a vocab file, any
`tokenizer.json` (SigLIP), and a stand-in that explains why a checkpoint has no tokenizer."""

from __future__ import annotations

import functools
import os

import numpy as np
import tokenizers
from tokenizers import normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from xmodal_jax.errors import UserError


class WordPieceTokenizer:
    """BERT-style WordPiece: `[CLS] text [SEP]`, truncated and zero-padded to `max_len`."""

    def __init__(self, vocab_file: str, max_len: int = 32, lowercase: bool = True):
        if not os.path.exists(vocab_file):
            raise FileNotFoundError(
                f"WordPiece vocab file {vocab_file!r} does not exist; pass the path of a "
                "BERT-style vocab.txt (one token per line)."
            )
        self.max_len = max_len
        tok = tokenizers.Tokenizer(WordPiece.from_file(vocab_file, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
        )
        tok.enable_truncation(max_len)
        self.pad_id = tok.token_to_id("[PAD]") or 0
        tok.enable_padding(length=max_len, pad_id=self.pad_id, pad_token="[PAD]")
        self._tok = tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, texts: list[str] | str) -> np.ndarray:
        """Token ids, int32 [N, max_len] (or [max_len] for one string); padding is `pad_id`."""
        single = isinstance(texts, str)
        encs = self._tok.encode_batch([texts] if single else list(texts))
        ids = np.asarray([e.ids for e in encs], np.int32)
        return ids[0] if single else ids


@functools.lru_cache(maxsize=8)
def wordpiece(vocab_file: str, max_len: int = 32, lowercase: bool = True) -> WordPieceTokenizer:
    """A cached tokenizer, so per-example preprocessing does not rebuild it."""
    return WordPieceTokenizer(vocab_file, max_len, lowercase)


class JsonTokenizer:
    """A `tokenizers` `tokenizer.json` applied as written (normaliser, model, special tokens),
    truncated and right-padded with `pad_id` to exactly `max_len`."""

    def __init__(self, tokenizer_json: str, max_len: int, pad_id: int):
        tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        tok.enable_truncation(max_len)
        tok.enable_padding(length=max_len, pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or "")
        self.max_len, self.pad_id, self._tok = max_len, pad_id, tok

    def encode(self, texts: list[str] | str) -> np.ndarray:
        """Token ids, int32 [N, max_len] (or [max_len] for one string)."""
        single = isinstance(texts, str)
        encs = self._tok.encode_batch([texts] if single else list(texts))
        ids = np.asarray([e.ids for e in encs], np.int32)
        return ids[0] if single else ids


class Unavailable:
    """Stands in for a tokenizer a checkpoint did not carry: `encode` raises `reason`."""

    def __init__(self, reason: str):
        self.reason = reason

    def encode(self, texts: list[str] | str) -> np.ndarray:
        raise UserError(self.reason)

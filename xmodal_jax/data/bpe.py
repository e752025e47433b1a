"""CLIP's byte-level BPE tokenizer over HF `tokenizers`, from `vocab.json` + `merges.txt`.

The pipeline is CLIP's (Radford et al. 2021; the same steps as the fast CLIP tokenizer of
`transformers`): NFC, whitespace runs to one space, lower-case; split into contractions,
letter runs, single digits and other-symbol runs; bytes mapped to printable characters; BPE
with `</w>` marking the end of a word. Sequences are `<|startoftext|> ... <|endoftext|>`,
truncated to `context_length` (the end token kept) and padded with id 0 as OpenAI CLIP does.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from xmodal_jax.errors import UserError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class CLIPTokenizer:
    """`encode(texts)` -> int32 `[N, context_length]`, `<|endoftext|>` has the highest id."""

    def __init__(
        self, vocab_file: str, merges_file: str, context_length: int = 77, pad_id: int = 0
    ):
        for path in (vocab_file, merges_file):
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"CLIP BPE file {path!r} does not exist; pass the vocab.json and merges.txt "
                    "of a CLIP tokenizer."
                )
        vocab, merges = BPE.read_file(vocab_file, merges_file)
        for special in (BOS, EOS):
            if special not in vocab:
                raise UserError(
                    f"{vocab_file} has no {special!r} token; it is not a CLIP vocabulary."
                )
        tok = tokenizers.Tokenizer(
            BPE(
                vocab,
                merges,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
            )
        )
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self.context_length = context_length
        self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, texts: list[str] | str) -> np.ndarray:
        """Token ids, int32 `[N, context_length]` (or `[context_length]` for one string)."""
        single = isinstance(texts, str)
        encs = self._tok.encode_batch([texts] if single else list(texts), add_special_tokens=False)
        out = np.full((len(encs), self.context_length), self.pad_id, np.int32)
        for i, enc in enumerate(encs):
            ids = [self.bos_id, *enc.ids][: self.context_length - 1] + [self.eos_id]
            out[i, : len(ids)] = ids
        return out[0] if single else out


@functools.lru_cache(maxsize=4)
def clip_bpe(vocab_file: str, merges_file: str, context_length: int = 77) -> CLIPTokenizer:
    """A cached CLIP tokenizer."""
    return CLIPTokenizer(vocab_file, merges_file, context_length)

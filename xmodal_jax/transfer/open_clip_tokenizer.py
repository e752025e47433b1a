"""The CLIP BPE tokenizer of an open_clip checkpoint, written into the converted file: from
`vocab.json` + `merges.txt` beside the weights, a `tokenizer.json` there, or the
`bpe_simple_vocab_16e6.txt.gz` that the open_clip package ships (found without importing it).
"""

from __future__ import annotations

import gzip
import json
from typing import Any

from xmodal_jax.transfer import open_clip_configs as configs
from xmodal_jax.transfer import torch_layout as tl
from xmodal_jax.transfer.open_clip_configs import Config


def _byte_symbols() -> list[str]:
    """CLIP's (GPT-2's) printable stand-in for each byte, in vocabulary order: the bytes that
    print as themselves ('!'..'~', '¡'..'¬', '®'..'ÿ') first, then the others mapped to
    chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def bpe_from_merges(text: str) -> tuple[str, str]:
    """`(vocab.json, merges.txt)` texts from open_clip's `bpe_simple_vocab_16e6.txt` (a version
    line, then merges by rank). The vocabulary is the 256 byte symbols, the same ending a word
    (`</w>`), one token per merge, then `<|startoftext|>` and `<|endoftext|>`; open_clip keeps
    the first 49,408 - 514 merges of the file."""
    n_merges = configs.BPE_VOCAB_SIZE - 2 * 256 - 2
    merges = text.split("\n")[1 : 1 + n_merges]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "\n".join(merges) + "\n"


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _hub_tokenizer(src: str) -> tuple[str, str] | None:
    vocab, merges = configs.beside(src, "vocab.json"), configs.beside(src, "merges.txt")
    if vocab and merges:
        return _read(vocab), _read(merges)
    path = configs.beside(src, "tokenizer.json")
    if path:
        model = json.loads(_read(path)).get("model") or {}
        if model.get("type") == "BPE":
            lines = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            return json.dumps(model["vocab"], ensure_ascii=False), "\n".join(
                ["#version: 0.2", *lines]
            )
    return None


NO_BPE_FIX = (
    "convert the open_clip weights again with open_clip installed (`pip install --no-deps "
    "open-clip-torch`: its BPE vocabulary file is read, the package is not imported), or with "
    "the vocab.json and merges.txt of a CLIP tokenizer beside them; or tokenize with open_clip "
    "and call encode_ids(ids)"
)


def tokenizer_meta(src: str, text_cfg: Config, vocab_size: int) -> dict[str, Any]:
    """Tokenizer metadata for the text tower: `{'tokenizer': ...}`, or `{'no_tokenizer_fix':
    ...}` saying how to supply token ids when no tokenizer can be carried."""
    if text_cfg.get("hf_tokenizer_name"):
        return {
            "no_tokenizer_fix": f"tokenize with the Hugging Face tokenizer "
            f"{text_cfg['hf_tokenizer_name']!r} as open_clip does and call encode_ids(ids)"
        }
    found = _hub_tokenizer(src)
    if found is not None:
        n = len(json.loads(found[0]))
        if n != vocab_size:
            raise tl.ConversionError(
                f"{src}: the tokenizer files beside the weights have {n} tokens, the text tower "
                f"{vocab_size}; remove the tokenizer files that do not belong to these weights."
            )
    elif vocab_size != configs.BPE_VOCAB_SIZE:
        return {
            "no_tokenizer_fix": f"this text tower has {vocab_size} tokens, not the "
            f"{configs.BPE_VOCAB_SIZE} of open_clip's CLIP BPE: put its own vocab.json and "
            "merges.txt beside the weights and convert again, or call encode_ids(ids)"
        }
    elif path := configs.package_file("bpe_simple_vocab_16e6.txt.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            found = bpe_from_merges(f.read())
    else:
        return {"no_tokenizer_fix": NO_BPE_FIX}
    vocab, merges = found
    return {"tokenizer": {"type": "clip_bpe", "vocab": vocab, "merges": merges}}

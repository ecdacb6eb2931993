"""Tokenizers for text conditioning: captions -> fixed-length int32 token ids (B, L).

    tok = tokenizer.from_config({"kind": "word", "vocab": "a red circle ...", "max_length": 16})
    ids = tok(["a red circle at the center on a black background"])  # (1, 16) int32

Kinds:
  word   word-level vocabulary (the `tokenizers` library): <pad>=0, <unk>=1, <bos>=2, <eos>=3,
         then the given words; "<bos> words <eos>" padded with <pad> to max_length.
  clip   a CLIP BPE tokenizer folder (vocab.json + merges.txt, as `transformers.CLIPTokenizer`
         reads), padded to max_length with its pad token (diffusers pads SD prompts to 77 with
         the end-of-text token). `path` is a folder or a built-in name: "shapes" is the BPE
         trained on the shapes captions (`train_clip_bpe`), shipped in data/tokenizers/shapes/
         and rebuilt by `python -m diffusion.data.tokenizer shapes OUT_DIR`.
Captions longer than max_length are truncated (the last token kept is <eos>).

CLIP's BPE (Radford et al. 2021) is byte-level: every byte has a token, alone and as a word end
(`</w>`), so any text encodes, unknown words as their bytes and known words as learned merges.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

SPECIAL_WORDS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0-3 of the word-level kind
KINDS = ("word", "clip")
BUILTIN = {"shapes": os.path.join(os.path.dirname(__file__), "tokenizers", "shapes")}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer split: special tokens, contractions, letter runs, single digits, other runs.
_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A callable: list of captions -> (B, max_length) int32 ids."""

    encode_batch: object  # list[str] -> list[list[int]], each exactly max_length long
    max_length: int
    vocab_size: int
    kind: str = "word"
    path: str | None = None  # the folder or built-in name of a "clip" tokenizer

    def __call__(self, captions) -> np.ndarray:
        ids = self.encode_batch([str(c) for c in captions])
        return np.asarray(ids, np.int32).reshape(len(ids), self.max_length)  # (B, L)


def word_level(vocab_words, max_length: int) -> Tokenizer:
    """Word-level tokenizer with <pad>, <unk>, <bos>, <eos> and padding (see module docstring)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate([*SPECIAL_WORDS, *vocab_words])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=max_length)
    tok.enable_truncation(max_length)
    encode = lambda texts: [e.ids for e in tok.encode_batch(texts)]
    return Tokenizer(encode, max_length, len(vocab))


def clip_folder(path: str, max_length: int) -> Tokenizer:
    """A CLIPTokenizer folder, padded ("max_length") and truncated to max_length."""
    from transformers import CLIPTokenizer

    folder = BUILTIN.get(path, path)
    if not os.path.exists(os.path.join(folder, "vocab.json")):
        raise FileNotFoundError(
            f"{path!r} is neither a CLIP tokenizer folder (vocab.json + merges.txt) nor a "
            f"built-in tokenizer ({sorted(BUILTIN)})"
        )
    tok = CLIPTokenizer.from_pretrained(folder)

    def encode(texts):
        return tok(texts, padding="max_length", max_length=max_length, truncation=True).input_ids

    return Tokenizer(encode, max_length, len(tok), "clip", path)


def from_config(cfg) -> Tokenizer:
    """A tokenizer from a config dict: {"kind": "word", "vocab", "max_length"} or
    {"kind": "clip", "path", "max_length"}."""
    kind = cfg.get("kind", "word")
    if kind == "word":
        return word_level(cfg["vocab"].split(), cfg["max_length"])
    if kind == "clip":
        return clip_folder(cfg["path"], cfg["max_length"])
    raise ValueError(f"unknown tokenizer kind {kind!r}; valid: {list(KINDS)}")


def byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for bytes 0..255, in CLIP's vocab order:
    printable Latin-1 bytes stand for themselves, the others map to chr(256 + k) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + k) for k in range(len(rest))]


def train_clip_bpe(texts, out_dir: str, *, vocab_size: int = 4096, model_max_length: int = 77):
    """Learn BPE merges on `texts` (CLIP's normaliser and pre-tokeniser) and write a folder that
    `transformers.CLIPTokenizer.from_pretrained` loads: vocab = 256 byte symbols, the same with
    `</w>`, one token per merge in merge order, then <|startoftext|>, <|endoftext|> (CLIP's
    layout; pad = unk = <|endoftext|>). Returns the vocabulary size."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(False)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, end_of_word_suffix="</w>", show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([str(t) for t in texts], trainer)
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    symbols = byte_symbols()
    tokens = [*symbols, *(b + "</w>" for b in symbols), *("".join(m) for m in merges), BOS, EOS]
    vocab = {}
    for t in tokens:  # a merge may rebuild an existing token: keep its first id
        vocab.setdefault(t, len(vocab))
    os.makedirs(out_dir, exist_ok=True)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(special, indent=2),
        "tokenizer_config.json": json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
             "do_lower_case": True, **special}, indent=2),
    }  # fmt: skip
    for name, text in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return len(vocab)


def shapes_captions(n: int = 5000) -> list[str]:
    """The first n captions of the shapes train split (generated, no dataset needed)."""
    from diffusion.data import shapes

    rng = lambda i: np.random.default_rng([0, 0, i])  # (seed, split "train", index)
    return [shapes.make_example(rng(i), 32)["caption"] for i in range(n)]


if __name__ == "__main__":  # python -m diffusion.data.tokenizer shapes OUT_DIR
    if len(sys.argv) != 3 or sys.argv[1] != "shapes":
        sys.exit("usage: python -m diffusion.data.tokenizer shapes OUT_DIR")
    size = train_clip_bpe(shapes_captions(), sys.argv[2], model_max_length=77)
    print(f"wrote a CLIP BPE tokenizer ({size} tokens) to {sys.argv[2]}")

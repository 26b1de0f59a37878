"""The teacher's tokenizer: a CLIP byte-level BPE in which every scene word is one token.

The vocabulary and merge files are generated offline from
:func:`condistill.world.scenes.vocabulary`; the result is a plain ``transformers.CLIPTokenizer``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from condistill.world.scenes import vocabulary

SPECIAL_BOS = "<|startoftext|>"
SPECIAL_EOS = "<|endoftext|>"

def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP reversible byte -> printable unicode character table.

    Printable latin-1 bytes map to themselves; the remaining bytes (controls, space,
    soft hyphen...) map to code points from 256 upwards, in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # CLIP orders its base vocabulary printable bytes first, then the remapped ones
    ordered = {b: table[b] for b in printable}
    ordered.update({b: table[b] for b in range(256) if b not in printable})
    return ordered


def clip_bpe_files(words: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merge list of a CLIP byte-level BPE in which every word is one token.

    The base vocabulary is CLIP's: the 256 byte symbols, then the same with the ``</w>``
    end-of-word suffix. Each word is then built by merging from its end: for ``red`` the
    merges are ``e d</w>`` then ``r ed</w>``. Every merge's right side ends in ``</w>``,
    so inside a word only the final pair can ever be merged: a known word always collapses
    to its single token whatever the merge ranks, and an unknown word falls back to known
    suffixes and single byte symbols (nothing is ever mapped to an unknown token).
    Returns ``(vocab, merges)`` with the two special tokens last, as in CLIP.
    """
    if isinstance(words, str):
        raise TypeError("words must be a sequence of words, not a single string")
    byte_symbols = list(bytes_to_unicode().values())
    tokens: list[str] = byte_symbols + [s + "</w>" for s in byte_symbols]
    known = set(tokens)
    merges: list[str] = []
    seen_merges: set[str] = set()
    for raw in words:
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError(f"vocabulary words must be non-empty strings, got {raw!r}")
        word = raw.strip().lower()
        if any(ch.isspace() for ch in word):
            raise ValueError(f"vocabulary entries must be single words, got {raw!r}")
        table = bytes_to_unicode()
        symbols = [table[b] for b in word.encode("utf-8")]
        suffix = symbols[-1] + "</w>"
        for left in reversed(symbols[:-1]):
            merge = f"{left} {suffix}"
            suffix = left + suffix
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
            if suffix not in known:
                known.add(suffix)
                tokens.append(suffix)
    tokens += [SPECIAL_BOS, SPECIAL_EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer_files(folder: str | Path, words: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (CLIP format) for ``words`` into ``folder``."""
    vocab, merges = clip_bpe_files(vocabulary() if words is None else words)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_tokenizer(words: Sequence[str] | None = None, model_max_length: int = 32):
    """A ``transformers.CLIPTokenizer`` in which every word of ``words`` (default: the scene
    vocabulary) is a single token. Padding uses ``<|endoftext|>`` as in SD 1.x."""
    from transformers import CLIPTokenizer

    if model_max_length < 4:
        raise ValueError(f"model_max_length must be at least 4 tokens, got {model_max_length}")
    vocab, merges = clip_bpe_files(vocabulary() if words is None else words)
    return CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        model_max_length=model_max_length,
        bos_token=SPECIAL_BOS,
        eos_token=SPECIAL_EOS,
        pad_token=SPECIAL_EOS,
        unk_token=SPECIAL_EOS,
    )


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionPipeline.encode_prompt`` makes them."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids

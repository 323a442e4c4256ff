"""Tokenizers for the tiny checkpoint, built offline from a small caption vocabulary (no downloads).

CLIP: a byte-level BPE whose merges are learnt here from ``CAPTION_WORDS`` (every caption word is one token);
T5: a Unigram model over the same words. Both load with the transformers classes of the released folders
(``CLIPTokenizer``, ``T5TokenizerFast``), so ordinary English captions map to mostly known ids instead of a column
of unknown tokens.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

CLIP_MAX_LENGTH = 77

# Words the tiny tokenizers know as whole tokens. Lowercase ASCII letters only (the CLIP BPE below relies on
# byte-level symbols being the letters themselves).
CAPTION_WORDS: tuple[str, ...] = tuple("""
a an the of in on at with and to from over under near by through into across along around behind above
is are it its this that there while as his her their
red green blue yellow orange purple pink black white gray grey brown golden silver colorful
square circle triangle ball box cube sphere line dot shape shapes
moving moves move left right up down forward backward slowly quickly fast slow
rotating spinning flying falling walking running swimming jumping dancing driving floating rolling turning
zooming panning flowing waving sitting standing looking holding playing smiling talking
man woman person people child girl boy dog cat bird fish horse car train boat plane tree trees flower flowers
water sky cloud clouds sun moon star stars wave waves
city street road beach ocean sea river lake forest mountain mountains field garden park room kitchen house
building snow rain night day sunset sunrise light shadow fire smoke
camera shot view close aerial scene video footage background foreground motion
big small large tiny tall long short bright dark beautiful old young happy calm cinematic realistic detailed
soft warm cold quality high one two three
""".split())


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for the bytes 0..255 (GPT-2 / CLIP convention).

    Printable Latin-1 bytes stand for themselves; the others are shifted past U+00FF so that every byte has a
    visible, non-whitespace symbol.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + shift)
            shift += 1
    return [symbols[b] for b in range(256)]


def _learn_bpe_merges(words: Iterable[str], end_of_word: str) -> list[tuple[str, str]]:
    """Plain BPE over ``words`` (each counted once) until every word is a single symbol.

    Ties go to the lexicographically smallest pair. The `tokenizers` trainer breaks ties by hash order, which
    changes between processes; this keeps the vocabulary, and hence the built files, identical for every run.
    """
    corpus = [tuple(w[:-1]) + (w[-1] + end_of_word,) for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for word in corpus for pair in zip(word, word[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        corpus = [_merge_pair(word, best) for word in corpus]


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build_clip_tokenizer(words: Iterable[str] = CAPTION_WORDS):
    """A CLIP tokenizer (byte-level BPE, ``</w>`` word ends) whose merges spell out ``words``.

    Vocabulary order follows CLIP's: the 256 byte symbols, the same with ``</w>``, the merges, and finally
    ``<|startoftext|>`` and ``<|endoftext|>``. End-of-text is the largest id, so CLIP's pooling finds it both by
    ``eos_token_id`` and by the legacy argmax rule.
    """
    from transformers import CLIPTokenizer

    words = list(words)
    bad = [w for w in words if not (w.isascii() and w.isalpha() and w.islower())]
    if bad:
        raise ValueError(f"caption words must be lowercase ASCII letters, got {bad[:5]}")
    suffix = "</w>"
    base = _byte_symbols()
    vocab: dict[str, int] = {}
    for token in [*base, *(s + suffix for s in base)]:
        vocab[token] = len(vocab)
    merges = _learn_bpe_merges(words, suffix)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer(words: Iterable[str] = CAPTION_WORDS):
    """A T5 tokenizer (Unigram, ``▁`` word starts) that knows ``words`` as whole pieces.

    Layout as in T5: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2. Words outside the list fall back to common suffixes
    and single characters (scores make whole words win), so only characters outside the table become ``<unk>``.
    """
    from transformers import T5TokenizerFast

    words = sorted(set(words))
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -5.0) for w in words]
    pieces += [("▁" + w.capitalize(), -5.5) for w in words if w.capitalize() != w]
    pieces += [(s, -7.0) for s in ("s", "es", "ed", "ing", "ly", "er", "est")]
    known = {p for p, _ in pieces}
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&%"
    pieces += [(c, -10.0) for c in chars if c not in known]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _save_clip_vocab_files(tokenizer, folder: Path) -> None:
    """Also write ``vocab.json`` + ``merges.txt``: the slow CLIPTokenizer of transformers 4.x reads only these."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------

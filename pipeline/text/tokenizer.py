"""CLIP's byte-level BPE tokenizer, exact, numpy-only (no torch): the ids OpenAI CLIP and open_clip give.

Follows OpenAI CLIP's ``clip/simple_tokenizer.py`` (and open_clip's ``tokenizer.py``, which
copies it): text clean-up (``ftfy.fix_text`` when ftfy is installed, ``html.unescape`` twice,
whitespace collapsed, stripped, lower-cased), the word-split pattern with ``\\p{L}``/``\\p{N}``
(hence the ``regex`` package), byte-level BPE over the first 48,894 merges of
``bpe_simple_vocab_16e6.txt.gz``; every row is ``<|startoftext|>`` + ids + ``<|endoftext|>``,
zero-padded to the context length (77). A prompt too long for the context is cut and its last id
set to ``<|endoftext|>`` (as ``clip.tokenize(truncate=True)`` and open_clip do), or refused.

One deliberate difference: a literal ``<|startoftext|>`` / ``<|endoftext|>`` typed inside a
prompt is tokenised as the plain characters it is made of, never as the special id. CLIP's text
tower reads its output at ``argmax(ids)``, the first 49407; a special id inside the prompt would
move that pick to the wrong place.

ftfy is optional: without it, plain-ASCII prompts get the same ids; curly quotes, full-width
text and mojibake may not. ``Tokenizer.info()["ftfy"]`` (recorded in every text output's
manifest) says whether it was used.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import regex

from pipeline.text import vocab as vocab_mod

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
SOT = 49406  # <|startoftext|>
EOT = 49407  # <|endoftext|>
N_MERGES = 49152 - 256 - 2  # 48,894: the merges CLIP uses; the file holds ~262k

# CLIP's pattern without its first two alternatives (the special tokens), see the module doc.
_WORDS = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
_SPACES = regex.compile(r"\s+")
# Text made only of these characters is left unchanged by ftfy.fix_text (nothing to fix: no
# non-ASCII, no control or escape characters, no '&' for its HTML unescape), so ftfy is skipped.
_FTFY_NOOP = regex.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")
_CACHE_LIMIT = 200_000


class TokenizerError(ValueError):
    """A prompt cannot be tokenised as asked (too long with truncation off)."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _ftfy_fixer(use_ftfy: bool | None):
    """(fix_text or None, ftfy version or None). use_ftfy None = use it when installed."""
    if use_ftfy is False:
        return None, None
    try:
        import ftfy
    except ImportError:
        if use_ftfy:
            raise ImportError("use_ftfy=True but ftfy is not installed (python3 -m pip install ftfy)") from None
        return None, None
    import importlib.metadata as md

    try:
        version = md.version("ftfy")
    except md.PackageNotFoundError:
        version = getattr(ftfy, "__version__", "unknown")
    return ftfy.fix_text, version


@dataclass
class Tokenized:
    """A tokenised batch."""

    ids: np.ndarray  # int32 [n, context_length]: sot, ids, eot, zeros
    lengths: np.ndarray  # int64 [n]: tokens each prompt needs incl. sot and eot (before truncation)
    context_length: int

    @property
    def truncated(self) -> list[int]:
        """Row numbers of the prompts that were cut to fit the context."""
        return [int(i) for i in np.flatnonzero(self.lengths > self.context_length)]

    @property
    def eot_positions(self) -> np.ndarray:
        """Where each row's <|endoftext|> is (what CLIP's argmax pick selects)."""
        return np.minimum(self.lengths, self.context_length) - 1


class Tokenizer:
    """CLIP BPE. ``Tokenizer()(["a photo of a dog."]).ids`` -> int32 [1, 77]."""

    sot = SOT
    eot = EOT
    vocab_size = VOCAB_SIZE

    def __init__(self, vocab_path: str | os.PathLike | None = None, use_ftfy: bool | None = None):
        data, path = vocab_mod.load_checked(vocab_path)
        merges_text = vocab_mod.read_gz_text(data).split("\n")[1:N_MERGES + 1]
        merges = [tuple(m.split()) for m in merges_text]
        b2u = bytes_to_unicode()
        symbols = list(b2u.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        assert len(vocab) == VOCAB_SIZE, len(vocab)
        self.encoder: dict[str, int] = {s: i for i, s in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = b2u
        self.byte_decoder = {u: b for b, u in b2u.items()}
        # per-character byte-level form of the 128 ASCII characters, for the common case
        self._ascii = {chr(b): b2u[b] for b in range(128)}
        self._word_ids: dict[str, tuple[int, ...]] = {}
        self._fix_text, self.ftfy_version = _ftfy_fixer(use_ftfy)
        self.vocab_path = str(path)

    # -- text clean-up ---------------------------------------------------------------------------
    def clean(self, text: str) -> str:
        """CLIP's clean-up: ftfy (if used), html.unescape twice, whitespace collapsed, stripped, lower-cased."""
        if self._fix_text is not None and not _FTFY_NOOP.fullmatch(text):
            text = self._fix_text(text)
        if "&" in text:
            text = html.unescape(html.unescape(text))
        text = _SPACES.sub(" ", text.strip()).strip()
        return text.lower()

    # -- BPE -------------------------------------------------------------------------------------
    def _bpe(self, token: str) -> list[str]:
        """Merge the byte-level symbols of one word (CLIP's SimpleTokenizer.bpe)."""
        word = list(token[:-1]) + [token[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best = None
            best_rank = None
            for pair in zip(word, word[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            n = len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def _word(self, w: str) -> tuple[int, ...]:
        ids = self._word_ids.get(w)
        if ids is None:
            if w.isascii():
                token = "".join(self._ascii[c] for c in w)
            else:
                token = "".join(self.byte_encoder[b] for b in w.encode("utf-8"))
            ids = tuple(self.encoder[s] for s in self._bpe(token))
            if len(self._word_ids) >= _CACHE_LIMIT:
                self._word_ids.clear()
            self._word_ids[w] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of one prompt, without <|startoftext|>/<|endoftext|>."""
        out: list[int] = []
        word = self._word
        for w in _WORDS.findall(self.clean(text)):
            out.extend(word(w))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text back from ids (for messages and debugging): skips <|startoftext|>, stops at <|endoftext|>."""
        parts = []
        for i in ids:
            i = int(i)
            if i == EOT:
                break
            if i != SOT:
                parts.append(self.decoder[i])
        text = "".join(parts)
        raw = bytearray()
        for piece in text.split("</w>"):
            raw += bytes(self.byte_decoder[c] for c in piece) + b" "
        return raw.decode("utf-8", errors="replace").strip()

    # -- batches ---------------------------------------------------------------------------------
    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
                 truncate: bool = True) -> Tokenized:
        return self.tokenize(texts, context_length, truncate)

    def tokenize(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
                 truncate: bool = True) -> Tokenized:
        """int32 [n, context_length] rows of sot + ids + eot, zero-padded.

        A prompt needing more than context_length tokens is cut with <|endoftext|> last
        (truncate=True; the row numbers are in ``Tokenized.truncated``) or raises TokenizerError.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        n = len(texts)
        ids = np.zeros((n, context_length), np.int32)
        lengths = np.zeros(n, np.int64)
        for i, text in enumerate(texts):
            toks = self.encode(text)
            length = len(toks) + 2
            lengths[i] = length
            if length > context_length:
                if not truncate:
                    raise TokenizerError(f"prompt {i + 1} needs {length} tokens, more than the context of "
                                         f"{context_length}: shorten it or allow truncation")
                toks = toks[:context_length - 2]
            row = ids[i]
            row[0] = SOT
            row[1:len(toks) + 1] = toks
            row[len(toks) + 1] = EOT
        return Tokenized(ids=ids, lengths=lengths, context_length=context_length)

    def info(self) -> dict:
        """What identifies this tokenizer's output (recorded in manifests)."""
        return {
            "name": "clip-bpe",
            "vocab": vocab_mod.VOCAB_NAME,
            "vocab_sha256": vocab_mod.VOCAB_SHA256,
            "vocab_size": VOCAB_SIZE,
            "context_length": CONTEXT_LENGTH,
            "ftfy": self.ftfy_version,
            "special_literals": "as_text",
        }


@lru_cache(maxsize=4)
def get_tokenizer(use_ftfy: bool | None = None) -> Tokenizer:
    """A shared Tokenizer (loading the vocab takes ~0.3 s)."""
    return Tokenizer(use_ftfy=use_ftfy)

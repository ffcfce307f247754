"""Titles: lower-case word tokens hashed into a fixed vocabulary.

Hashing needs no vocabulary file and takes any word, seen in training or not. The hash is BLAKE2b of the
word's UTF-8 bytes, so ids are the same in every process and on every machine (Python's ``hash()`` of a str
is salted per process, which would give each DataLoader worker a different vocabulary).
"""

from __future__ import annotations

import hashlib
import re

import torch

PAD_ID = 0
_WORD = re.compile(r"\w+", re.UNICODE)


def words(title: str) -> list[str]:
    """Lower-case word tokens: runs of letters, digits and underscores (any script)."""
    return _WORD.findall(title.lower())


def token_id(word: str, vocab_size: int) -> int:
    """Stable id in [1, vocab_size) of a word; 0 is kept for padding."""
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (vocab_size - 1)


def tokenize(
    title: str, vocab_size: int = 16384, max_tokens: int = 32, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask of a title.

    Args:
        title: any text; words beyond `max_tokens` are dropped.
        pad_to: length to pad to (>= the number of tokens kept); None pads to at least one position, so that
            a title without words is one masked position rather than an empty tensor.

    Returns:
        ids (LongTensor[W]) with PAD_ID at padded positions, mask (BoolTensor[W]) True at real tokens.
    """
    if not isinstance(title, str):
        raise TypeError(f"tokenize: title must be a str, got {type(title).__name__}")
    if vocab_size < 2:
        raise ValueError(f"tokenize: vocab_size must be >= 2 (id 0 is padding), got {vocab_size}")
    ids = [token_id(w, vocab_size) for w in words(title)[:max_tokens]]
    length = max(len(ids), 1) if pad_to is None else pad_to
    if length < len(ids):
        raise ValueError(f"tokenize: pad_to={pad_to} is shorter than the {len(ids)} tokens kept")
    out = torch.full((length,), PAD_ID, dtype=torch.long)
    out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros(length, dtype=torch.bool)
    mask[: len(ids)] = True
    return out, mask

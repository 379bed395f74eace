"""A CLIP BPE tokenizer built for the shapes domain, with no download.

Why: OpenAI's CLIP vocabulary cannot be fetched here, and 49k tokens would dwarf a tiny text
encoder. This writes ``vocab.json`` + ``merges.txt`` in exactly the format of
``transformers.CLIPTokenizer``: every domain word is one token (its merges build it from
characters), and single characters stay in the vocabulary so any text still tokenizes.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from sdwb.shapes import vocabulary

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Vocabulary (token -> id) and BPE merges that make each word in ``words`` a single token."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens: list[str] = []
    for c in chars:
        tokens += [c, c + "</w>"]
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Simulate CLIP's BPE with the merges so far and append merges (lowest priority, so they
        # never disturb words built earlier) until the word comes out as one token.
        while len(pieces := _bpe(word, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(" ".join(pair))
            if pair[0] + pair[1] not in tokens:
                tokens.append(pair[0] + pair[1])
    tokens += list(SPECIAL_TOKENS)
    return {t: i for i, t in enumerate(tokens)}, merges


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the best-ranked adjacent pair."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, _ = min(pairs)
        if rank == float("inf"):
            break
        best = next(p for r, i in pairs if r == rank for p in [(pieces[i], pieces[i + 1])])
        merged, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def save_tokenizer(directory: str | Path, model_max_length: int = 32):
    """Write a domain CLIPTokenizer to ``directory`` and return it loaded back."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(vocabulary())
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )
    tok.save_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory)

"""A Hugging Face folder's own tokenizer: whether the folder has one (resolving checks it at
`kiln check` time) and loading it for text data. Light at import: transformers loads only when a
tokenizer does."""

from __future__ import annotations

from pathlib import Path

from kiln.errors import StepError

# A folder holds a real tokenizer when it has one of these (fast tokenizer, WordPiece, BPE or
# SentencePiece vocabularies). Without them transformers 5 builds a tokenizer of special tokens from
# config.json alone, which turns every word into [UNK].
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path, facts: dict | None = None):
    """The tokenizer of a Hugging Face model folder (text data is tokenized with the source's own).

    Only a folder with tokenizer files has one: transformers would otherwise build a tokenizer of
    special tokens from config.json, and every word would become [UNK]. Batches of texts of several
    lengths need padding: a tokenizer without a pad token (GPT-2 style) pads with its eos token,
    and `facts` (the step's facts, for the report) says so."""
    import os

    if not has_tokenizer(folder):
        raise StepError(str(folder), f"text data needs the model's tokenizer, but the folder has none of {', '.join(TOKENIZER_FILES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at build time
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise StepError(str(folder), "the tokenizer has no pad token and no eos token to pad batches of texts with; set pad_token in tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
        if facts is not None:
            facts["pad_token"] = "eos (the tokenizer had none)"
    return tokenizer

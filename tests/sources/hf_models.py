"""Tiny random-weight Hugging Face model folders for tests (no downloads): transformers configs with
fixed seeds, saved with save_pretrained, and tokenizers built offline from a small vocabulary."""

from __future__ import annotations

from pathlib import Path

WORDS = ["the", "a", "model", "kiln", "builds", "artifacts", "example", "with", "padding", "so", "mask",
         "is", "not", "all", "ones", "an", "text", "short", "long", "sentence", "one", "two", "three"]
SENTENCES = ["kiln builds the model", "a short sentence", "an example with padding so the mask is not all ones",
             "one two three", "the long text", "a model builds artifacts"]
BERT_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)


def _save(model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


def wordpiece_tokenizer(folder: Path) -> None:
    """A BERT WordPiece tokenizer over WORDS, saved into `folder` (vocab.txt, tokenizer.json...)."""
    from transformers import BertTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizerFast(vocab=vocab).save_pretrained(folder)


def bpe_tokenizer_without_pad(folder: Path) -> None:
    """A GPT-2 style byte-level BPE tokenizer with an eos token and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer)
    wrapped = GPT2TokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    assert wrapped.pad_token is None
    wrapped.save_pretrained(folder)


def bert(folder: Path, cls: str = "BertModel", tokenizer: bool = True, seed: int = 0, **config) -> Path:
    """A tiny BERT of class `cls` (BertModel, BertForSequenceClassification, BertForMaskedLM...)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls)(transformers.BertConfig(vocab_size=len(WORDS) + 5, **(BERT_SIZES | config)))
    _save(model, folder)
    if tokenizer:
        wordpiece_tokenizer(folder)
    return folder


def gpt2(folder: Path, seed: int = 0) -> Path:
    """A tiny GPT-2 causal LM (tied lm_head) with a BPE tokenizer that has no pad token."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    _save(GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)), folder)
    bpe_tokenizer_without_pad(folder)
    return folder


def t5_encoder(folder: Path, seed: int = 0) -> Path:
    """A tiny T5 encoder saved as T5EncoderModel (architectures: ["T5EncoderModel"]), no tokenizer."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=37, num_layers=2, num_heads=2, is_encoder_decoder=False, use_cache=False)
    return _save(T5EncoderModel(config), folder)


def vit_classifier(folder: Path, seed: int = 0, labels: int = 3) -> Path:
    """A tiny ViT image classifier (16x16 RGB, 4x4 patches), no tokenizer."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=37, num_labels=labels)
    return _save(ViTForImageClassification(config), folder)

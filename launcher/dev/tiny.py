"""Tiny models built on the fly: for tests, smoke runs and laptops without a model cache.

A tokenizer is trained on a small corpus with `tokenizers` and a randomly initialised model of the
requested architecture is saved beside it as a normal Hugging Face model directory.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterable
from pathlib import Path

import torch

ARCHITECTURES = ("gpt2", "llama", "bert")
SPECIAL = {"bos": "<|bos|>", "eos": "<|endoftext|>", "pad": "<|pad|>", "unk": "<|unk|>"}


def default_corpus() -> list[str]:
    """A small English corpus the project generates itself (see launcher.dev.synthetic)."""
    from launcher.dev.synthetic import review_rows, story_lines

    texts = [row["text"] for row in review_rows(600, seed=1)]
    texts += story_lines(300, seed=2)
    return texts


def train_tokenizer(arch: str, corpus: Iterable[str], vocab_size: int = 512):
    """A fast tokenizer for `arch` trained on `corpus` (byte-level BPE, or WordPiece for BERT)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    corpus = list(corpus)
    if arch == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(
            corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
        )
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        tok.decoder = decoders.WordPiece()
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=512,
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL["eos"], SPECIAL["bos"], SPECIAL["unk"]]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    # GPT-2 style: no pad token, so the launcher's pad-token handling is exercised.
    extra = {"bos_token": SPECIAL["bos"]} if arch == "llama" else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL["eos"],
        unk_token=SPECIAL["unk"],
        model_max_length=1024,
        **extra,
    )


def model_config(arch: str, vocab_size: int, width: int = 64, layers: int = 2, **overrides):
    """A small config of the given architecture."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_positions=256,
            n_embd=width,
            n_layer=layers,
            n_head=4,
            bos_token_id=1,
            eos_token_id=0,
        )
    elif arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=width * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=0,
            tie_word_embeddings=True,
        )
    elif arch == "bert":
        cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=width * 2,
            max_position_embeddings=256,
            pad_token_id=0,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@functools.lru_cache(maxsize=8)
def _shared_tokenizer(arch: str, corpus: tuple[str, ...], vocab_size: int):
    """One trained tokenizer per (arch, corpus, size) in a process: the WordPiece trainer breaks
    ties in no fixed order, so two tiny BERTs built here (a teacher and its student) would
    otherwise get different vocabularies."""
    return train_tokenizer(arch, corpus, vocab_size)


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "gpt2",
    *,
    width: int = 64,
    layers: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Write a tiny randomly initialised `arch` model + tokenizer to `out_dir` and return it.

    The model is saved as a base model for causal LM heads (GPT-2, Llama) or as a BERT encoder;
    task heads are added by the launcher on load, as with any hub checkpoint.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = copy.deepcopy(
        _shared_tokenizer(
            arch, tuple(corpus if corpus is not None else default_corpus()), vocab_size
        )
    )
    cfg = model_config(arch, len(tokenizer), width=width, layers=layers)
    if arch == "gpt2":
        cfg.bos_token_id = tokenizer.convert_tokens_to_ids(SPECIAL["bos"])
        cfg.eos_token_id = tokenizer.eos_token_id
    elif arch == "llama":
        cfg.bos_token_id = tokenizer.bos_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
    else:
        cfg.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    factory = AutoModel if arch == "bert" else AutoModelForCausalLM
    model = factory.from_config(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "ftlaunch-tiny.json").write_text(
        json.dumps({"arch": arch, "width": width, "layers": layers})
    )
    return out

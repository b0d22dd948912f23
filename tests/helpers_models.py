"""Tiny randomly initialised models with locally trained tokenizers, for tests (no downloads).

``make_tiny_model(arch, path)`` writes a complete transformers folder (config, safetensors
weights, tokenizer) that ``zofast.models.load_model(path)`` and ``from_pretrained`` load.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

__all__ = [
    "TINY_ARCHS",
    "TINY_KINDS",
    "tiny_corpus",
    "make_tokenizer",
    "make_tiny_model",
    "tiny_gpt2_lm",
    "tiny_opt_lm",
    "optimizer",
    "weights",
]

TINY_ARCHS = ("roberta", "bert", "bert-encoder", "gpt2", "opt", "llama")
TINY_KINDS = {
    "roberta": "mlm",
    "bert": "mlm",
    "bert-encoder": "encoder",
    "gpt2": "causal",
    "opt": "causal",
    "llama": "causal",
}

_WORDS = (
    "It was terrible great bad good Yes No ? , . : Description Entity Expression Human "
    "Location Number Answer type The sentiment is negative positive Does this mean that true or"
)


def tiny_corpus() -> list[str]:
    """Sentences to train tiny tokenizers on: the demo set plus the built-in label words."""
    from zofast.data import load_demo

    texts = [ex.text_a for split in load_demo().values() for ex in split]
    return texts + [_WORDS] * 20


def _byte_bpe(corpus: list[str], specials: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def make_tokenizer(style: str, corpus: list[str] | None = None, vocab_size: int = 600):
    """Train a small tokenizer that behaves like a real model family's.

    Args:
        style: ``"roberta"`` (byte-level BPE, ``<s> … </s>``, ``<mask>`` with lstrip),
            ``"gpt2"`` (byte-level BPE, no pad token, no special tokens added),
            ``"opt"`` (byte-level BPE, prepends ``</s>``), ``"llama"`` (sentencepiece-style
            Metaspace BPE, prepends ``<s>``), ``"bert"`` (uncased WordPiece, ``[CLS] … [SEP]``).
        corpus: training sentences (default :func:`tiny_corpus`).
        vocab_size: target vocabulary size.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    corpus = corpus if corpus is not None else tiny_corpus()
    fast = transformers.PreTrainedTokenizerFast
    if style == "roberta":
        tok = _byte_bpe(corpus, ["<s>", "<pad>", "</s>", "<unk>"], vocab_size)
        tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
        )
        return fast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            sep_token="</s>",
            cls_token="<s>",
            pad_token="<pad>",
            unk_token="<unk>",
            mask_token="<mask>",
        )
    if style == "gpt2":
        tok = _byte_bpe(corpus, ["<|endoftext|>"], vocab_size)
        eos = "<|endoftext|>"
        return fast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos)
    if style == "opt":
        tok = _byte_bpe(corpus, ["<s>", "<pad>", "</s>", "<unk>"], vocab_size)
        tok.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
        )
        return fast(
            tokenizer_object=tok,
            bos_token="</s>",
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
        )
    if style == "llama":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
        )
        tok.train_from_iterator(corpus, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
        return fast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if style == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer)
        tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
        return fast(
            tokenizer_object=tok,
            cls_token="[CLS]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            unk_token="[UNK]",
            mask_token="[MASK]",
        )
    raise ValueError(f"unknown tokenizer style {style!r}")


def make_tiny_model(
    arch: str, path: str | Path, *, hidden_size: int = 32, num_layers: int = 2, seed: int = 0
) -> Path:
    """Write a tiny random model and its tokenizer to ``path``.

    Args:
        arch: one of ``TINY_ARCHS``: ``"roberta"`` (RobertaForMaskedLM), ``"bert"``
            (BertForMaskedLM), ``"bert-encoder"`` (bare BertModel, no LM head, like MiniLM),
            ``"gpt2"`` (GPT2LMHeadModel), ``"opt"`` (OPTForCausalLM with a projection
            ``word_embed_proj_dim = hidden_size // 2``), ``"llama"`` (LlamaForCausalLM, GQA).
        path: output folder (created).
        hidden_size: model width (even).
        num_layers: transformer layers.
        seed: ``torch.manual_seed`` for the weights.

    Returns:
        ``path`` as a ``Path``; ``TINY_KINDS[arch]`` is the kind ``load_model`` should detect.

    Example:
        >>> lm = load_model(make_tiny_model("gpt2", tmp_path / "gpt2"))
    """
    path = Path(path)
    style = {"bert-encoder": "bert"}.get(arch, arch)
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    tok = make_tokenizer(style)
    vocab = len(tok)
    heads = 2
    common = {"vocab_size": vocab, "max_position_embeddings": 256}
    if arch == "roberta":
        config = transformers.RobertaConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            intermediate_size=2 * hidden_size,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **common,
        )
        cls = transformers.RobertaForMaskedLM
    elif arch in ("bert", "bert-encoder"):
        config = transformers.BertConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            intermediate_size=2 * hidden_size,
            pad_token_id=tok.pad_token_id,
            **common,
        )
        cls = transformers.BertForMaskedLM if arch == "bert" else transformers.BertModel
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=heads,
            n_positions=256,
            vocab_size=vocab,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        cls = transformers.GPT2LMHeadModel
    elif arch == "opt":
        config = transformers.OPTConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            ffn_dim=2 * hidden_size,
            word_embed_proj_dim=hidden_size // 2,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **common,
        )
        cls = transformers.OPTForCausalLM
    else:
        config = transformers.LlamaConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            intermediate_size=2 * hidden_size,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **common,
        )
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_gpt2_lm() -> transformers.GPT2LMHeadModel:
    """A one-layer GPT-2 LM (width 16, vocabulary 50) built in memory after ``manual_seed(0)``.

    Example:
        >>> tiny_gpt2_lm().transformer.h[0].attn.c_attn.weight.shape
        torch.Size([16, 48])
    """
    config = transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, n_positions=32, vocab_size=50, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def tiny_opt_lm() -> transformers.OPTForCausalLM:
    """A one-layer OPT LM (width 16, vocabulary 50) built in memory after ``manual_seed(0)``.

    Example:
        >>> tiny_opt_lm().config.ffn_dim
        32
    """
    config = transformers.OPTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
        word_embed_proj_dim=8, vocab_size=50, max_position_embeddings=32, pad_token_id=1,
        bos_token_id=2, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(config)


def optimizer(method: str, model, options: dict):
    """The tests' "mezo" / "lozo" / "lozo-m" optimizer of `model` (lr = eps = 1e-2, seed 7; LOZO:
    rank 2, nu 4), with `options` (weight_decay through param_groups)."""
    from zofast.optim import LOZO, MeZO, param_groups

    options = dict(options)
    groups = param_groups(model, options.pop("weight_decay", 0.0))
    common = dict(lr=1e-2, eps=1e-2, seed=7, model=model, **options)
    if method == "mezo":
        return MeZO(groups, **common)
    return LOZO(groups, rank=2, nu=4, momentum=0.9 if method == "lozo-m" else 0.0, **common)


def weights(model) -> dict:
    """{name: a CPU copy of the parameter}."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}

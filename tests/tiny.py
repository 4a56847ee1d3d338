"""Tiny randomly initialised checkpoints (several architectures) and a tiny BPE tokenizer, built offline."""

from __future__ import annotations

from pathlib import Path

import torch


def train_tokenizer(out: Path, vocab_size: int = 384):
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(topics.values()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(str(out))
    return fast


def make_config(arch: str, vocab: int, n_layers: int = 2):
    from transformers import GPTNeoXConfig, LlamaConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=vocab, num_hidden_layers=n_layers, max_position_embeddings=256)
    if arch == "llama":
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=192,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=1,
            **common,
        )
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1, **common
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, bos_token_id=0, eos_token_id=1, **common)
    if arch == "opt":
        return OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            vocab_size=vocab,
            num_hidden_layers=n_layers,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    raise ValueError(arch)


def make_checkpoint(out: Path, arch: str = "llama", n_layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, len(tok), n_layers), dtype=torch.float32)
    model.to(dtype).save_pretrained(str(out))
    return out

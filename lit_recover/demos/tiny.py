"""Tiny LLaMA-family models and tokenizers built on the fly, for tests and the offline smoke demo.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in memory on a fixed
text, and the model is a randomly initialised ``LlamaForCausalLM`` whose layers are then pruned
to uneven widths exactly as a structural pruner would leave them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lit_recover.pruning.structure import prune_attention_groups, prune_mlp_channels

_CORPUS = """\
Below is an instruction that describes a task. Write a response that appropriately completes the request.
Below is an instruction that describes a task, paired with an input that provides further context.
### Instruction:
### Input:
### Response:
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Give three tips for staying healthy. Eat a balanced diet, exercise regularly and sleep well.
What is the capital of France? The capital of France is Paris.
Explain what a function does. It returns the sum of the numbers in a list.
Translate the sentence into French. Summarize the text in one sentence. List five colours.
The model was pruned and then fine-tuned with low-rank adapters to recover its quality.
0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } , . ; : ! ? ' " _ # @ % & < > | \\ ~ ^ $
"""


def build_tokenizer(vocab_size: int = 384):
    """A small LLaMA-like fast tokenizer: byte-level BPE, ``<unk>``=0, ``<s>``=1, ``</s>``=2, BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=2048,
    )


def build_tiny_llama(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """A randomly initialised dense ``LlamaForCausalLM`` of the given size (GQA when kv < heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model


def prune_unevenly(model, seed: int = 0) -> None:
    """Prune each decoder layer to a different width, keeping the first and last layers dense.

    Layer ``i`` keeps a seeded random subset of KV groups and MLP channels, so every middle layer
    ends up with its own shapes, as LLM-Pruner's block-wise pruning leaves them.
    """
    gen = torch.Generator().manual_seed(seed)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if i == 0 or i == len(layers) - 1:
            continue
        attn, mlp = layer.self_attn, layer.mlp
        kv_heads = attn.k_proj.out_features // attn.head_dim
        keep_kv = max(1, kv_heads - (i % kv_heads))
        groups = torch.randperm(kv_heads, generator=gen)[:keep_kv].tolist()
        prune_attention_groups(attn, groups)
        width = mlp.gate_proj.out_features
        keep_ch = max(8, width - 16 * i)
        prune_mlp_channels(mlp, torch.randperm(width, generator=gen)[:keep_ch].tolist())


def build_tiny_pruned(seed: int = 0, num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
                      hidden_size: int = 64, intermediate_size: int = 128):
    """``(model, tokenizer)``: a tiny GQA LLaMA with unevenly pruned middle layers, in eval mode."""
    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers,
                             num_heads=num_heads, num_kv_heads=num_kv_heads,
                             intermediate_size=intermediate_size, seed=seed)
    prune_unevenly(model, seed=seed)
    model.eval()  # pruners usually pickle in eval mode; the loader must flip it back
    return model, tokenizer


def write_tiny_pruned(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write a tiny pruned model as an LLM-Pruner pickle ``{'model', 'tokenizer'}`` and return its path."""
    from lit_recover.models.load import save_pruned

    model, tokenizer = build_tiny_pruned(seed=seed, **kwargs)
    return save_pruned(model, tokenizer, path)


if __name__ == "__main__":  # python -m lit_recover.demos.tiny OUT.bin
    import sys

    print(write_tiny_pruned(sys.argv[1] if len(sys.argv) > 1 else "results/tiny/pruned_model.bin"))

"""Tiny models built from a config in code (the *tiny* profile): seconds on a CPU, no download.

They exercise every code path the real models use — a Llama, a Qwen3 and a NemotronH with the hybrid
Mamba2 / MoE / attention structure of Nemotron-3-Nano in miniature — with random weights (seeded) and a byte-level
BPE tokenizer trained in code, with a chat template. They are for tests and CI, never for numbers about LLMs.
"""

from __future__ import annotations

import functools

import torch

from cbo_utils.model.blocks import NATIVE_NAME, pattern_types

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A little English so the tokenizer learns real merges (byte-level, so any text still encodes).
_CORPUS = """
The method gives every block of a language model a gate on its residual path. Removing a block sets its gate
from one to zero. The loss change is expanded to second order around the trained model, and the Hessian of the
gates is approximated by the empirical Fisher information built from per-sample gradients. Choosing which blocks
to remove then becomes a quadratic binary optimisation problem with a fixed number of ones: an Ising model with
fixed magnetization. Its ground state and its low-lying excited states are candidate pruned models. Water boils
at one hundred degrees at sea level. Plants make sugar from light, water and carbon dioxide. The heart pumps blood
through the arteries and the veins. A triangle has three sides and its angles add up to one hundred and eighty
degrees. Question: what is the capital of France? Answer: Paris is the capital of France.
""" * 4

# "M" Mamba2, "E" MoE, "*" attention, "-" MLP — the Nemotron-3-Nano layout in miniature.
TINY_NEMOTRON_PATTERN = "MEMEM*EMEM*EME"


@functools.lru_cache(maxsize=1)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split("\n"), trainer)
    return tok.to_str()


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in code (deterministic), with bos/eos/pad and a ChatML chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _common(tok, num_layers: int, hidden: int) -> dict:
    return dict(
        vocab_size=len(tok), hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, num_hidden_layers=num_layers,
    )


def tiny_llama(num_layers: int = 6, hidden: int = 64, seed: int = 0, tokenizer=None):
    """A randomly initialised LlamaForCausalLM (about 0.1 M parameters) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer or build_tokenizer()
    cfg = LlamaConfig(intermediate_size=2 * hidden, tie_word_embeddings=True, **_common(tok, num_layers, hidden))
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval(), tok


def tiny_qwen3(num_layers: int = 6, hidden: int = 64, seed: int = 0, tokenizer=None, sliding_window: int | None = 64):
    """A randomly initialised Qwen3ForCausalLM; with ``sliding_window`` the upper layers use sliding attention,
    so removal must rewrite ``layer_types`` and ``max_window_layers``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = tokenizer or build_tokenizer()
    cfg = Qwen3Config(
        intermediate_size=2 * hidden, tie_word_embeddings=False, use_sliding_window=sliding_window is not None,
        sliding_window=sliding_window, max_window_layers=num_layers // 2, **_common(tok, num_layers, hidden),
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval(), tok


def tiny_nemotron_h(pattern: str = TINY_NEMOTRON_PATTERN, hidden: int = 64, seed: int = 0, tokenizer=None,
                    experts_per_token: int = 2):
    """A randomly initialised NemotronHForCausalLM with the Nano structure in miniature (native layout): 4 routed
    experts, ``experts_per_token`` of them per token, plus a shared expert."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    tok = tokenizer or build_tokenizer()
    cfg = NemotronHConfig(
        vocab_size=len(tok), hidden_size=hidden, layers_block_type=[NATIVE_NAME[t] for t in pattern_types(pattern)],
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, intermediate_size=2 * hidden,
        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16,
        n_routed_experts=4, num_experts_per_tok=experts_per_token, n_shared_experts=1, moe_intermediate_size=hidden,
        moe_shared_expert_intermediate_size=hidden, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return NemotronHForCausalLM(cfg).eval(), tok


TINY_BUILDERS = {"tiny-llama": tiny_llama, "tiny-qwen3": tiny_qwen3, "tiny-nemotron-h": tiny_nemotron_h}


def build_tiny(name: str, **kw):
    """``build_tiny("tiny-llama")`` → (model, tokenizer). Names: tiny-llama, tiny-qwen3, tiny-nemotron-h."""
    try:
        return TINY_BUILDERS[name](**kw)
    except KeyError:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_BUILDERS)}") from None

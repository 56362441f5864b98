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


_SLIDING = ["sliding_attention", "full_attention"]
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}

#: one tiny model per supported decoder family: ``config.model_type`` and the settings that exercise what the family
#: has (sliding/full layer patterns, sparse-step and dense-prefix MoE layouts, multipliers, partial rotary, ...)
TINY_FAMILIES: dict[str, tuple[str, dict]] = {
    "tiny-mistral": ("mistral", {"sliding_window": 8}),
    "tiny-qwen2": ("qwen2", {}),
    "tiny-smollm3": ("smollm3", {"no_rope_layer_interval": 3}),
    "tiny-phi3": ("phi3", {}),
    "tiny-starcoder2": ("starcoder2", {}),
    "tiny-granite": ("granite", {"residual_multiplier": 0.5, "embedding_multiplier": 2.0, "logits_scaling": 2.0,
                                 "attention_multiplier": 0.25}),
    "tiny-olmo": ("olmo", {}),
    "tiny-ernie4_5": ("ernie4_5", {}),
    "tiny-seed-oss": ("seed_oss", {}),
    "tiny-arcee": ("arcee", {}),
    "tiny-hunyuan-dense": ("hunyuan_v1_dense", {}),
    "tiny-apertus": ("apertus", {}),
    "tiny-gemma": ("gemma", {}),
    "tiny-gemma2": ("gemma2", {"sliding_window": 8, "layer_types": _SLIDING}),
    "tiny-gemma3": ("gemma3_text", {"sliding_window": 8, "layer_types": ["sliding_attention"] * 2 + _SLIDING}),
    "tiny-olmo2": ("olmo2", {}),
    "tiny-olmo3": ("olmo3", {"sliding_window": 8, "layer_types": _SLIDING}),
    "tiny-exaone4": ("exaone4", {"sliding_window": 8, "layer_types": _SLIDING}),
    "tiny-glm4": ("glm4", {}),
    "tiny-phi": ("phi", {}),
    "tiny-cohere": ("cohere", {}),
    "tiny-cohere2": ("cohere2", {"sliding_window": 8, "layer_types": _SLIDING}),
    "tiny-gpt-neox": ("gpt_neox", {}),
    "tiny-mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "tiny-qwen2-moe": ("qwen2_moe", {**_MOE, "shared_expert_intermediate_size": 32, "decoder_sparse_step": 2,
                                     "mlp_only_layers": [0]}),
    "tiny-qwen3-moe": ("qwen3_moe", {**_MOE, "decoder_sparse_step": 2, "mlp_only_layers": [0]}),
    "tiny-olmoe": ("olmoe", {"num_experts": 4, "num_experts_per_tok": 2}),
    "tiny-deepseek-v3": ("deepseek_v3", {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
                                         "moe_intermediate_size": 32, "first_k_dense_replace": 2, "kv_lora_rank": 16,
                                         "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                                         "v_head_dim": 16, "n_group": 1, "topk_group": 1, "head_dim": 8,
                                         "num_key_value_heads": 4,   # MLA has no grouped KV heads
                                         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "tiny-glm4-moe": ("glm4_moe", {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
                                   "moe_intermediate_size": 32, "first_k_dense_replace": 1, "n_group": 1,
                                   "topk_group": 1}),
    "tiny-gpt-oss": ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8,
                                 "layer_types": _SLIDING}),
    "tiny-granite-moe": ("granitemoe", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                        "residual_multiplier": 0.5}),
    "tiny-falcon-h1": ("falcon_h1", {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1,
                                     "mamba_d_state": 16, "mamba_chunk_size": 16, "mamba_d_conv": 4}),
}


def tiny_family(model_type: str, num_layers: int = 6, hidden: int = 64, seed: int = 0, tokenizer=None, **overrides):
    """A randomly initialised causal LM of any ``model_type`` transformers builds from a config in code, with the
    shared tiny sizes (``overrides`` go to the config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tokenizer or build_tokenizer()
    if "layer_types" in overrides:   # a repeating pattern, tiled to the depth
        overrides["layer_types"] = [overrides["layer_types"][i % len(overrides["layer_types"])]
                                    for i in range(num_layers)]
    cfg = AutoConfig.for_model(model_type, intermediate_size=2 * hidden, **{**_common(tok, num_layers, hidden),
                                                                            **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval(), tok


def _family_builder(name: str):
    model_type, overrides = TINY_FAMILIES[name]
    return functools.partial(tiny_family, model_type, **overrides)


TINY_BUILDERS = {"tiny-llama": tiny_llama, "tiny-qwen3": tiny_qwen3, "tiny-nemotron-h": tiny_nemotron_h,
                 **{name: _family_builder(name) for name in TINY_FAMILIES}}


def build_tiny(name: str, **kw):
    """``build_tiny("tiny-llama")`` → (model, tokenizer). Names: tiny-llama, tiny-qwen3, tiny-nemotron-h and one per
    decoder family (:data:`TINY_FAMILIES`)."""
    try:
        return TINY_BUILDERS[name](**kw)
    except KeyError:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_BUILDERS)}") from None

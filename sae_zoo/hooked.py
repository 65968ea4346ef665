"""A transformers Llama as a TransformerLens ``HookedTransformer``, for peers' code that reads models through
TransformerLens (SAEBench loads LMs with ``HookedTransformer.from_pretrained_no_processing``, whose list of models
lacks SmolLM2 and any local model). The weights are TransformerLens's own ``convert_llama_weights`` of the loaded
model, unprocessed (no layer-norm folding, no centring), so ``blocks.L.hook_resid_post`` holds what the transformers
model's block ``L`` outputs."""

from __future__ import annotations

from typing import Any

from torch import nn


def hooked_llama(lm: nn.Module, tokenizer: Any, *, model_name: str = "llama") -> Any:
    """``lm`` (a transformers ``LlamaForCausalLM``, e.g. SmolLM2) as a ``HookedTransformer`` with ``tokenizer``;
    BOS is prepended as the tokenizer's own ``bos_token``. Needs ``transformer_lens`` (a test extra)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    c = lm.config
    if c.model_type != "llama":
        raise ValueError(f"hooked_llama: {type(lm).__name__} is a {c.model_type!r} model, not a Llama")
    scaling = getattr(c, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ValueError(f"hooked_llama: rope_scaling {scaling} is not converted")
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    theta = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings,
        d_vocab=c.vocab_size, act_fn=c.hidden_act, normalization_type="RMS", eps=c.rms_norm_eps,
        positional_embedding_type="rotary", rotary_dim=d_head, rotary_base=theta, rotary_adjacent_pairs=False,
        final_rms=True, gated_mlp=True, original_architecture="LlamaForCausalLM", model_name=model_name,
        dtype=next(lm.parameters()).dtype, device=str(next(lm.parameters()).device),
        default_prepend_bos=tokenizer.bos_token_id is not None)
    hooked = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    hooked.load_and_process_state_dict(convert_llama_weights(lm, cfg), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    return hooked.eval()

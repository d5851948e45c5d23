"""vqgen.modules: shared layers (attention with an explicit KV cache, RoPE, norms, SwiGLU)."""
from vqgen.modules.attention import Attention, TransformerBlock, attention_mask, init_cache
from vqgen.modules.layers import DenseGeneral, RMSNorm, SwiGLU, find_multiple, swiglu_hidden_dim
from vqgen.modules.rope import apply_rope, rope_1d_table, rope_2d_table

__all__ = [
    "Attention",
    "TransformerBlock",
    "attention_mask",
    "init_cache",
    "DenseGeneral",
    "RMSNorm",
    "SwiGLU",
    "find_multiple",
    "swiglu_hidden_dim",
    "apply_rope",
    "rope_1d_table",
    "rope_2d_table",
]

"""The K2 model: MLA attention, SwiGLU / MoE FFN (ffn slot), YaRN RoPE, decoder stack."""

from .attention import MLA, build_mla
from .decoder import CausalLMOutput, DecoderLayer, K2ForCausalLM, K2Model, build_model
from .layers import RMSNorm, SwiGLU, build_swiglu
from .rope import RotaryEmbedding, apply_rotary, rope_parameters, softmax_scale, yarn_get_mscale

__all__ = [
    "MLA",
    "CausalLMOutput",
    "DecoderLayer",
    "K2ForCausalLM",
    "K2Model",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "apply_rotary",
    "build_mla",
    "build_model",
    "build_swiglu",
    "rope_parameters",
    "softmax_scale",
    "yarn_get_mscale",
]

"""The K2 model: MLA attention, SwiGLU / MoE FFN (ffn slot), YaRN RoPE, decoder stack."""

from .attention import MLA, MLALatents, build_mla
from .decoder import CausalLMOutput, DecoderLayer, K2ForCausalLM, K2Model, build_model
from .layers import RMSNorm, SwiGLU, build_swiglu
from .rope import RotaryEmbedding, apply_rotary, rope_parameters, softmax_scale, yarn_get_mscale
from .saved import ExpertsSaved, announce_saved, listen_saved

__all__ = [
    "MLA",
    "CausalLMOutput",
    "DecoderLayer",
    "ExpertsSaved",
    "K2ForCausalLM",
    "K2Model",
    "MLALatents",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "announce_saved",
    "apply_rotary",
    "build_mla",
    "build_model",
    "build_swiglu",
    "listen_saved",
    "rope_parameters",
    "softmax_scale",
    "yarn_get_mscale",
]

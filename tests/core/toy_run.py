"""A toy dataset and FFN plugin and a small model config for the orchestrator's tests."""

from __future__ import annotations

import torch
from k2_core import hookimpl
from k2_core.configio import load_config
from k2_core.orchestrator import build_run
from k2_core.plugins import load_plugins
from pydantic import BaseModel


class ToyOptions(BaseModel):
    period: int = 7


class ToyData:
    """Sequences counting up with a fixed stride: learnable, deterministic, resumable."""

    def __init__(
        self,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        split: str,
        options: ToyOptions,
        vocab: int = 512,
    ):
        self.b, self.t, self.vocab = batch_size, seq_len, vocab
        self.offset = 0 if split == "train" else 10_000
        self.seed, self.period, self.pos = seed, options.period, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + self.pos)
            start = torch.randint(0, self.vocab, (self.b, 1), generator=g)
            seq = (start + self.period * torch.arange(self.t + 1)) % self.vocab
            self.pos += 1
            yield {"input_ids": seq[:, :-1], "labels": seq[:, 1:]}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


class ToyPlugin:
    """Registers the toy dataset and a dense FFN that can be told to return NaN."""

    __k2_distribution__ = "toy"
    poison_steps: set[int] = set()

    def __init__(self):
        self.calls = 0

    @hookimpl
    def k2_register(self, registry):
        registry.register(
            "dataset",
            "toy",
            lambda *, options, split, batch_size, seq_len, seed, rank, world_size: ToyData(
                batch_size=batch_size,
                seq_len=seq_len,
                seed=seed + rank,
                split=split,
                options=options,
            ),
            ToyOptions,
        )
        plugin = self

        def nan_swiglu(model, moe, layer_idx, *, registry, options):
            from k2_core.model.layers import SwiGLU

            class Poisoned(SwiGLU):
                def forward(self, x):
                    out = super().forward(x)
                    if self.training and plugin.calls in plugin.poison_steps:
                        out = out * float("nan")
                    plugin.calls += self.training
                    return out

            return Poisoned(model.hidden_size, model.intermediate_size)

        registry.register("ffn", "nan_swiglu", nan_swiglu)


BASE = [
    "model.vocab_size=512",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.q_lora_rank=32",
    "model.kv_lora_rank=32",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
    "moe.moe_intermediate_size=32",
    "moe.n_routed_experts=8",
    "moe.num_experts_per_tok=2",
    "data.seq_len=32",
    "data.dataset=toy",
    "optim.name=adamw",
    "optim.lr=3e-3",
    "optim.schedule=constant",
    "optim.schedule_options={}",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.eval_every=5",
    "train.eval_batches=2",
    "tracking.options.system_metrics=false",
]


def make(tmp_path, *extra, plugin=None, more=()):
    """A run of the small model on the toy data under `tmp_path/run` (extra plugins: `more`)."""
    plugin = plugin or ToyPlugin()
    pl = load_plugins(extra=[("toy", plugin), *more])
    cfg = load_config(
        "tiny", [*BASE, f"checkpoint.dir={tmp_path / 'run'}", *extra], registry=pl.registry
    )
    return build_run(cfg, pl)

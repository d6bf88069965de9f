"""Split a model's parameters into Muon groups (hidden matrices) and AdamW groups (the rest)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

#: module-name components whose weights stay on AdamW (embeddings and output heads)
ADAMW_NAMES: tuple[str, ...] = ("lm_head", "embed_tokens", "wte", "wpe", "embed_positions")


def _is_router(module_name: str, module: nn.Module) -> bool:
    # k2-moe / HF DeepseekV3: `mlp.gate` (SigmoidRouter / DeepseekV3TopkRouter);
    # Mixtral: `.gate` Linear
    return module_name.rsplit(".", 1)[-1] == "gate" or "router" in type(module).__name__.lower()


def classify(
    model: nn.Module,
    *,
    adamw_names: Iterable[str] = ADAMW_NAMES,
    router_on_adamw: bool = True,
) -> dict[str, list[tuple[str, Tensor]]]:
    """{"muon": [...], "adamw": [...], "adamw_no_decay": [...]} of (name, param), model order.

    - muon: trainable parameters with ndim >= 2 that are not embeddings, the output head or
      the MoE router weight;
    - adamw: embeddings (any nn.Embedding, or a module named like `adamw_names`), the LM head
      (also found through `get_output_embeddings()` and weights tied to an embedding) and the
      router weight (`*.gate.weight` or a module whose class name contains "Router");
    - adamw_no_decay: every 1-D/0-D parameter (norm weights, biases).
    """
    names = set(adamw_names)
    forced: set[int] = set()
    for mname, mod in model.named_modules():
        parts = set(mname.split(".")) if mname else set()
        if (
            isinstance(mod, nn.Embedding)
            or parts & names
            or (router_on_adamw and mname and _is_router(mname, mod))
        ):
            forced.update(id(p) for p in mod.parameters(recurse=False))
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except Exception:  # noqa: BLE001 - some models raise NotImplementedError
            head = None
        if isinstance(head, nn.Module):
            forced.update(id(p) for p in head.parameters(recurse=False))
    out: dict[str, list[tuple[str, Tensor]]] = {"muon": [], "adamw": [], "adamw_no_decay": []}
    for name, p in model.named_parameters():  # tied parameters appear once
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            out["adamw_no_decay"].append((name, p))
        elif id(p) in forced:
            out["adamw"].append((name, p))
        else:
            out["muon"].append((name, p))
    return out


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    adamw_lr: float | None = None,
    adamw_wd: float | None = None,
    *,
    adamw_names: Iterable[str] = ADAMW_NAMES,
    router_on_adamw: bool = True,
    no_decay_1d: bool = True,
) -> list[dict[str, Any]]:
    """Optimizer param groups for `Muon`/`MuonClip` (each has "name" and "use_muon").

    Muon gets the hidden matrices (lr, weight_decay); AdamW gets embeddings, head, router
    weight (adamw_lr or lr, adamw_wd or weight_decay) and the 1-D parameters (no weight decay
    when `no_decay_1d`). Empty groups are left out.
    """
    parts = classify(model, adamw_names=adamw_names, router_on_adamw=router_on_adamw)
    a_lr = lr if adamw_lr is None else adamw_lr
    a_wd = weight_decay if adamw_wd is None else adamw_wd
    groups = [
        {
            "name": "muon",
            "use_muon": True,
            "lr": lr,
            "weight_decay": weight_decay,
            "params": [p for _, p in parts["muon"]],
        },
        {
            "name": "adamw",
            "use_muon": False,
            "lr": a_lr,
            "weight_decay": a_wd,
            "params": [p for _, p in parts["adamw"]],
        },
        {
            "name": "adamw_no_decay",
            "use_muon": False,
            "lr": a_lr,
            "weight_decay": 0.0 if no_decay_1d else a_wd,
            "params": [p for _, p in parts["adamw_no_decay"]],
        },
    ]
    return [g for g in groups if g["params"]]

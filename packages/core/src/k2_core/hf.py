"""Hugging Face interop: DeepseekV3 / Kimi K2 config.json and safetensors checkpoints.

- `config_from_hf` / `config_to_hf` map config.json onto (ModelConfig, MoEConfig) and back;
- `load_pretrained` reads a checkpoint folder (single file or sharded index; per-expert or
  stacked expert tensors; block-FP8 weights dequantised on load; MTP layers and rotary
  buffers ignored) into a K2ForCausalLM;
- `save_pretrained` writes config.json, safetensors shards in the hub's per-expert layout and
  model.safetensors.index.json, which transformers loads as DeepseekV3ForCausalLM, with
  ordinary permissions (0644 files, 0755 folders).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from .config import ModelConfig, MoEConfig, RopeScaling
from .errors import CheckpointError, ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "kimi_k2")
FP8_BLOCK = 128
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_MODEL_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "first_k_dense_replace",
    "num_attention_heads",
    "num_key_value_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_interleave",
    "attention_bias",
    "tie_word_embeddings",
    "initializer_range",
)
_MOE_KEYS = (
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "scoring_func",
    "topk_method",
)


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------
def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters")
    if not isinstance(params, Mapping):
        params = d.get("rope_scaling")
    params = dict(params or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) if params else "default"
    if kind in (None, "default"):
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"rope_scaling: only yarn is supported (got {kind!r})")
    if params.get("attention_factor") is not None:
        raise ConfigError(
            "rope_scaling.attention_factor: an explicit YaRN attention factor is not supported"
        )
    orig = params.get("original_max_position_embeddings")
    if orig is None:
        raise ConfigError("rope_scaling.original_max_position_embeddings: required for yarn")
    factor = params.get("factor")
    if factor is None:
        factor = d["max_position_embeddings"] / orig
    # transformers treats a missing mscale / mscale_all_dim as "off" (falsy): keep that as 0.0.
    scaling = RopeScaling(
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
    )
    return theta, scaling


def config_from_hf(d: Mapping[str, Any]) -> tuple[ModelConfig, MoEConfig]:
    """(ModelConfig, MoEConfig) from a DeepseekV3 / Kimi K2 config.json dict."""
    mt = d.get("model_type", "deepseek_v3")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type: expected one of {', '.join(SUPPORTED_MODEL_TYPES)} (got {mt!r})"
        )
    theta, scaling = _rope_from_hf(d)
    m = {k: d[k] for k in _MODEL_KEYS if k in d and d[k] is not None}
    heads, kvh = m.get("num_attention_heads"), m.get("num_key_value_heads")
    if kvh is not None and (heads is None or kvh <= 0 or heads % kvh):
        m.pop("num_key_value_heads")  # unused by MLA; an inconsistent value is dropped
    if "q_lora_rank" in d:
        m["q_lora_rank"] = d["q_lora_rank"]  # None is meaningful (direct q_proj)
    m["rope_theta"] = theta
    m["rope_scaling"] = scaling
    e = {k: d[k] for k in _MOE_KEYS if k in d and d[k] is not None}
    try:
        return ModelConfig(**m), MoEConfig(**e)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"config.json: {loc}: {err['msg']}") from None


def config_to_hf(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> dict[str, Any]:
    """A config.json dict that transformers loads as DeepseekV3ForCausalLM."""
    out: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
    }
    for k in _MODEL_KEYS:
        out[k] = getattr(model_cfg, k)
    if out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = model_cfg.num_attention_heads
    for k in _MOE_KEYS:
        out[k] = getattr(moe_cfg, k)
    rs = model_cfg.rope_scaling
    if rs is None:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": model_cfg.rope_theta}
    else:
        out["rope_parameters"] = {
            "rope_type": "yarn",
            "rope_theta": model_cfg.rope_theta,
            "factor": rs.factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
            "beta_fast": rs.beta_fast,
            "beta_slow": rs.beta_slow,
            "mscale": rs.mscale,
            "mscale_all_dim": rs.mscale_all_dim,
        }
    out["rope_theta"] = model_cfg.rope_theta
    out["num_nextn_predict_layers"] = 0
    out["attention_dropout"] = 0.0
    out["dtype"] = "float32"
    return out


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------
_EXPERT_RE = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def dequantize_fp8_block(
    w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK
) -> torch.Tensor:
    """w (float8) [out, in] * scale_inv [ceil(out/block), ceil(in/block)] per block -> fp32."""
    out_f, in_f = w.shape[-2:]
    s = scale_inv.float().repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return w.float() * s[..., :out_f, :in_f]


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).exists():
                raise CheckpointError(f"{path / f}: listed in {INDEX_NAME} but missing")
        return [path / f for f in files]
    single = path / SINGLE_NAME
    if single.exists():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors")
    return files


def _iter_tensors(files: list[Path], num_layers: int) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(name, dequantised tensor, file) for every model tensor; skips MTP layers and rotary
    buffers."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
            key_set = set(keys)
            for name in keys:
                if (
                    name.endswith("_scale_inv")
                    or "rotary_emb" in name
                    or name.endswith(".inv_freq")
                ):
                    continue
                m = _LAYER_RE.match(name)
                if m and int(m.group(1)) >= num_layers:
                    continue  # MTP (next-n prediction) layers
                t = f.get_tensor(name)
                if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    sname = name + "_scale_inv"
                    if sname not in key_set and name.endswith(".weight"):
                        sname = name[: -len(".weight")] + ".weight_scale_inv"
                    if sname not in key_set:
                        raise CheckpointError(
                            f"{name}: FP8 weight without {name}_scale_inv in {file.name}"
                        )
                    t = dequantize_fp8_block(t, f.get_tensor(sname))
                yield name, t, file


_FP32_SUFFIXES = (".mlp.gate.weight", ".e_score_correction_bias")


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters/buffers to `dtype`, keeping the router weight and correction bias
    in fp32 (as transformers' `_keep_in_fp32_modules_strict` does)."""
    model.to(dtype)
    if dtype != torch.float32:
        with torch.no_grad():
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if name.endswith(_FP32_SUFFIXES) and t.is_floating_point():
                    t.data = t.data.float()
    return model


def _checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds: parameters (a tied head once) and router correction
    biases."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.nn.Parameter) or name.endswith(".e_score_correction_bias"):
            out[name] = t
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


def load_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    registry: Any = None,
    device: torch.device | str | None = None,
):
    """A K2ForCausalLM from a folder with config.json and safetensors weights."""
    from .model.decoder import K2ForCausalLM

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file}: missing")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from None
    model_cfg, moe_cfg = config_from_hf(hf_cfg)
    files = _checkpoint_files(path)

    with torch.device(device) if device is not None else torch.device("cpu"):
        model = K2ForCausalLM(model_cfg, moe_cfg, registry=registry, init_weights=False)
    cast_model(model, dtype)
    targets = _checkpoint_tensors(model)
    if model_cfg.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    seen: set[str] = set()
    pending: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # per-expert tensors to stack
    pending_file: dict[str, Path] = {}

    def assign(name: str, t: torch.Tensor, file: Path) -> None:
        dst = targets.get(name)
        if dst is None and t.numel() == 0:
            return  # e.g. HF's zero-width shared expert when n_shared_experts == 0
        if dst is None:
            raise CheckpointError(f"unexpected tensor {name} in {file.name}")
        if tuple(dst.shape) != tuple(t.shape):
            raise CheckpointError(
                f"{name} in {file.name}: shape {tuple(t.shape)} does not match the model's "
                f"{tuple(dst.shape)}"
            )
        with torch.no_grad():
            dst.copy_(t.to(dst.dtype))
        seen.add(name)

    n_exp = moe_cfg.n_routed_experts
    for name, t, file in _iter_tensors(files, model_cfg.num_hidden_layers):
        if model_cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        m = _EXPERT_RE.match(name)
        if m is None:
            assign(name, t, file)
            continue
        prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
        if e >= n_exp:
            raise CheckpointError(f"unexpected tensor {name} in {file.name} (only {n_exp} experts)")
        pending.setdefault(prefix, {}).setdefault(e, {})[proj] = t
        pending_file[prefix] = file
        experts = pending[prefix]
        if len(experts) == n_exp and all(len(v) == 3 for v in experts.values()):
            gate_up = torch.stack(
                [
                    torch.cat((experts[i]["gate_proj"], experts[i]["up_proj"]), 0)
                    for i in range(n_exp)
                ]
            )
            down = torch.stack([experts[i]["down_proj"] for i in range(n_exp)])
            assign(prefix + ".gate_up_proj", gate_up, file)
            assign(prefix + ".down_proj", down, file)
            del pending[prefix]
    for prefix, experts in pending.items():
        for i in range(n_exp):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if proj not in experts.get(i, {}):
                    raise CheckpointError(
                        f"missing tensor {prefix}.{i}.{proj}.weight "
                        f"(experts of {pending_file[prefix].name})"
                    )
    missing = [k for k in targets if k not in seen and not k.endswith("rotary_emb.inv_freq")]
    if missing:
        where = files[0].name if len(files) == 1 else f"{path.name}/{INDEX_NAME}"
        raise CheckpointError(
            f"missing tensor {missing[0]} in {where}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    model.model.rotary_emb.reset_parameters()
    return model.eval()


def _hub_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors in the hub layout (per-expert gate/up/down weights)."""
    for name, t in _checkpoint_tensors(model).items():
        if name.endswith(".experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :inter]
                yield f"{prefix}.{e}.up_proj.weight", t[e, inter:]
        elif name.endswith(".experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e]
        else:
            yield name, t


def save_pretrained(model, path: str | Path, max_shard_bytes: int = 5 * 1024**3) -> list[Path]:
    """Write config.json, safetensors shards (hub layout) and model.safetensors.index.json."""
    from safetensors.torch import save_file

    path = Path(path)
    made = [p.absolute() for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps(config_to_hf(model.config, model.moe_config), indent=2) + "\n"
    )
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, t in _hub_tensors(model):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().to("cpu").clone()  # no shared storage between views
        size += nbytes
        total += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    written = []
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        written.append(path / fname)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    ordinary_permissions(path, [*made, path / "config.json", path / INDEX_NAME, *written])
    return written


def ordinary_permissions(folder: str | Path, paths: list[str | Path]) -> None:
    """Give `folder` and `paths` (relative to it or absolute) ordinary permissions: 0755
    folders, 0644 files, whatever wrote them (safetensors writes 0600) and whatever the umask.
    Only what the export wrote: other files in the folder stay as they are."""
    folder = Path(folder)
    for p in [folder, *(folder / q for q in paths)]:
        if p.is_symlink() or not p.exists():
            continue
        p.chmod(0o755 if p.is_dir() else 0o644)


__all__ = [
    "config_from_hf",
    "config_to_hf",
    "dequantize_fp8_block",
    "cast_model",
    "load_pretrained",
    "save_pretrained",
    "ordinary_permissions",
]

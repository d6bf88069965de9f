"""Activation-memory policies applied from outside the model, and a meter of saved bytes.

K2 cut activation memory three ways (K2_REFERENCE.md, Infrastructure); each is a switch of
`ActivationPolicy` and `apply_activation_policy(model, policy)` applies them to a built
`K2ForCausalLM` without touching its code or its state-dict names:

- `recompute`: RMSNorm, the dense SwiGLU product, the MLA up-projections (q_b_proj /
  kv_b_proj through RoPE to the attention inputs q, k, v) and the MoE down-projection inputs
  (the routed and shared SwiGLU products) are not kept for the backward. Each such part runs
  as a reentrant `torch.utils.checkpoint` region, which saves only its inputs; tensors the
  region *outputs* that later ops save (e.g. the q, k, v that attention keeps) are packed as
  a recipe (the region's function and its inputs' packed handles) and rebuilt on unpack.
- `fp8_storage`: the MoE up-projection input, the routed and shared gate/up pre-activations
  (the SwiGLU inputs) and the dense SwiGLU inputs are stored as FP8-E4M3 in 1x128 tiles with
  one FP32 scale per tile, and dequantised to their dtype on unpack (compute is unchanged).
- `cpu_offload`: every other saved activation goes to host memory (pinned, copied on a side
  stream on CUDA; plain copies on CPU) and comes back on unpack.

The policy wraps the model's seams, never copies of its code: `MLA.expand` (the
up-projections through RoPE) and `SwiGLU.gated` (silu(g) * u) run as recompute regions and
RMSNorm's forward as one; k2_moe's experts kernel, a custom autograd function, names what it
saves (`k2_core.model.saved.ExpertsSaved`, announced before `save_for_backward`) and the policy
recognises those tensors by that announcement. A MoE layer whose kernel announced nothing under
recompute or FP8 storage is an error, not a silent fallback.

The policies act through `torch.autograd.graph.saved_tensors_hooks` opened around each decoder
layer's forward (one "session" per layer call), so they also hold when a pipeline stage runs
layers directly. Embedding, final norm and head are outside any layer and left as they are.

`measure_saved_bytes(model, fn)` counts, per decoder layer, the bytes each layer keeps on the
device for its backward (storages deduplicated; parameters excluded) and the bytes it put in
host memory.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from k2_core.model.saved import ExpertsSaved, listen_saved
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn
from torch.utils.checkpoint import checkpoint

FP8_TILE = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


class ActivationPolicy(BaseModel):
    """Which activation-memory savings to apply (each one independent of the others)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    recompute: bool = Field(
        False,
        description="Recompute RMSNorm, SwiGLU products, MLA up-projections and MoE "
        "down-projection inputs in the backward instead of keeping them.",
    )
    fp8_storage: bool = Field(
        False,
        description="Keep MoE up-projection inputs and SwiGLU inputs as FP8-E4M3 in "
        "1x128 tiles with FP32 scales (storage only; compute keeps its dtype).",
    )
    cpu_offload: bool = Field(
        False, description="Move every other saved activation to host memory until the backward."
    )

    @property
    def active(self) -> bool:
        """True when any saving is switched on."""
        return self.recompute or self.fp8_storage or self.cpu_offload


POLICY_LEVELS: dict[str, ActivationPolicy] = {
    "none": ActivationPolicy(),
    "recompute": ActivationPolicy(recompute=True),
    "recompute+fp8": ActivationPolicy(recompute=True, fp8_storage=True),
    "recompute+fp8+offload": ActivationPolicy(recompute=True, fp8_storage=True, cpu_offload=True),
}


# --- FP8 tiles ----------------------------------------------------------------------------


@dataclass
class Fp8Tiles:
    """A tensor stored as FP8-E4M3 tiles of 1x128 along its last dim, one FP32 scale a tile."""

    data: torch.Tensor  # [rows, tiles, 128] float8_e4m3fn
    scale: torch.Tensor  # [rows, tiles, 1] float32
    shape: torch.Size
    dtype: torch.dtype

    def nbytes(self) -> int:
        """Bytes held (payload and scales)."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * 4


def fp8_quantize(x: torch.Tensor) -> Fp8Tiles:
    """Quantise `x` to FP8-E4M3 in 1x128 tiles (last dim zero-padded to a multiple of 128)."""
    width = x.shape[-1] if x.dim() else 1
    rows = x.numel() // max(width, 1)
    tiles = -(-width // FP8_TILE)
    flat = x.detach().reshape(rows, width).float()
    pad = tiles * FP8_TILE - width
    if pad:
        flat = F.pad(flat, (0, pad))
    flat = flat.view(rows, tiles, FP8_TILE)
    amax = flat.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    data = (flat / scale).to(torch.float8_e4m3fn)
    return Fp8Tiles(data, scale, x.shape, x.dtype)


def fp8_dequantize(q: Fp8Tiles) -> torch.Tensor:
    """The tensor back in its shape and dtype (tile-wise FP8 value times its scale)."""
    rows, tiles, _ = q.data.shape
    width = q.shape[-1] if len(q.shape) else 1
    flat = (q.data.float() * q.scale).view(rows, tiles * FP8_TILE)[:, :width]
    return flat.to(q.dtype).reshape(q.shape)


# --- packed handles -----------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Offloaded:
    """A saved tensor living in host memory until its unpack (or a prefetch ahead of it)."""

    __slots__ = ("cpu", "device", "stream", "back", "ready")

    def __init__(self, t: torch.Tensor, stream: torch.cuda.Stream | None):
        self.device = t.device
        self.stream = stream
        self.back: torch.Tensor | None = None
        self.ready = None
        if stream is None:
            self.cpu = t.detach().to("cpu", copy=True)
            return
        self.cpu = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            self.cpu.copy_(t.detach(), non_blocking=True)
        t.record_stream(stream)  # keep the device memory until the copy has read it

    def prefetch(self) -> None:
        """Start the copy back on the side stream (CUDA only; after the copy out, in order)."""
        if self.stream is None or self.back is not None:
            return
        with torch.cuda.stream(self.stream):
            self.back = self.cpu.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(self.stream)

    def restore(self) -> torch.Tensor:
        """The tensor back on its device."""
        if self.stream is None:
            return self.cpu
        self.prefetch()
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(self.ready)
        t, self.back = self.back, None
        t.record_stream(cur)  # allocated on the side stream, used on this one
        return t


class _RecipeGroup:
    """A region's function and its inputs' packed handles: rebuilds the region's outputs."""

    __slots__ = ("fn", "inputs", "outputs", "cache", "pending", "autocast", "__weakref__")

    def __init__(
        self, fn: Callable[..., Any], inputs: list[Any], outputs: tuple[torch.Tensor, ...]
    ):
        self.fn = fn
        self.inputs = inputs
        self.outputs = [weakref.ref(o) for o in outputs]
        self.cache: tuple[torch.Tensor, ...] | None = None
        self.pending = 0
        # the backward runs outside the forward's autocast: replay it, or the rebuilt tensors
        # come back in another dtype than the ones that were saved
        self.autocast = [
            (dev, torch.get_autocast_dtype(dev))
            for dev in ("cpu", "cuda")
            if torch.is_autocast_enabled(dev)
        ]

    def output(self, i: int) -> torch.Tensor:
        """Output `i`, recomputed under no_grad (once while several unpacks want it)."""
        if self.cache is None:
            args = [_unpack(h) for h in self.inputs]
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                for dev, dtype in self.autocast:
                    stack.enter_context(torch.autocast(dev, dtype))
                out = self.fn(*args)
            self.cache = out if isinstance(out, tuple) else (out,)
        res = self.cache[i]
        self.pending -= 1
        if self.pending <= 0:
            self.cache = None
        return res


class _Recipe:
    """A saved tensor rebuilt from a recipe: a view (offset/size/stride) of a region output."""

    __slots__ = ("group", "index", "geometry")

    def __init__(self, group: _RecipeGroup, index: int, t: torch.Tensor, base: torch.Tensor):
        self.group = group
        self.index = index
        same = (
            t.storage_offset() == base.storage_offset()
            and t.shape == base.shape
            and t.stride() == base.stride()
        )
        self.geometry = None if same else (t.shape, t.stride(), t.storage_offset())

    def restore(self) -> torch.Tensor:
        """Recompute the region output and take the same view of it."""
        out = self.group.output(self.index)
        if self.geometry is None:
            return out
        shape, stride, offset = self.geometry
        return out.as_strided(shape, stride, offset)


@dataclass
class _SwiGLUParts:
    """One SwiGLU inside the experts kernel (routed or shared): what rebuilds its product.

    `h` and `ws` are the packed handles of the announced pre-activations and gate weights
    (`ws` stays None for the shared expert, which has no gate weight)."""

    inter: int
    weighted: bool
    h: Any = None
    ws: Any = None


class _Deferred:
    """A saved MoE SwiGLU product recomputed from the saved pre-activations (and gate weights)."""

    __slots__ = ("parts",)

    def __init__(self, parts: _SwiGLUParts):
        self.parts = parts

    def restore(self) -> torch.Tensor:
        """silu(gate) * up (* routed gate weight), exactly as the experts kernel forms it."""
        p = self.parts
        h = _unpack(p.h)
        with torch.no_grad():
            act = F.silu(h[:, : p.inter]).mul_(h[:, p.inter :])
            if p.weighted:
                act.mul_(_unpack(p.ws))
        return act


def _unpack(h: Any) -> torch.Tensor:
    if isinstance(h, torch.Tensor):
        return h
    if isinstance(h, Fp8Tiles):
        return fp8_dequantize(h)
    return h.restore()


# --- sessions -----------------------------------------------------------------------------


@dataclass
class SavedBytes:
    """Bytes a layer keeps for its backward: on the device and in host memory."""

    device: int = 0
    host: int = 0


@dataclass
class _Meter:
    layers: dict[int, SavedBytes] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)

    def add(self, layer: int, kept: Any) -> None:
        rec = self.layers.setdefault(layer, SavedBytes())
        for t, where in _storages(kept):
            key = t.untyped_storage().data_ptr()
            if key in self.seen:
                continue
            self.seen.add(key)
            if where == "device":
                rec.device += t.untyped_storage().nbytes()
            else:
                rec.host += t.untyped_storage().nbytes()


def _storages(kept: Any) -> list[tuple[torch.Tensor, str]]:
    if isinstance(kept, torch.Tensor):
        return [(kept, "device")]
    if isinstance(kept, Fp8Tiles):
        return [(kept.data, "device"), (kept.scale, "device")]
    if isinstance(kept, _Offloaded):
        return [(kept.cpu, "host")]
    return []


_METERS: list[_Meter] = []
_SESSIONS: list[_Session] = []


class _Session:
    """The saved-tensor hooks of one decoder-layer forward under a policy."""

    def __init__(
        self,
        policy: ActivationPolicy,
        layer: int,
        params: set[int],
        stream: torch.cuda.Stream | None,
    ):
        self.policy = policy
        self.layer = layer
        self.params = params
        self.stream = stream
        self.recipes: dict[int, tuple[_RecipeGroup, int]] = {}
        self.fp8: dict[int, weakref.ref] = {}
        self.cache: dict[tuple, tuple[weakref.ref, Any]] = {}
        # storage key -> (role in ExpertsSaved, the SwiGLU it belongs to), from announcements
        self.experts: dict[int, tuple[str, _SwiGLUParts]] = {}
        self.announced = 0  # experts-kernel announcements seen (the MoE post-hook checks)
        self.offloaded: list[_Offloaded] = []
        self.prev: weakref.ref | None = None  # the previous layer's session, same forward
        self.unpacked = False

    # regions ---------------------------------------------------------------------------
    def region(self, fn: Callable[..., Any], *inputs: torch.Tensor) -> Any:
        """Run `fn` as a recompute region; its outputs are packed as recipes if saved later."""
        out = checkpoint(fn, *inputs, use_reentrant=True)
        outs = out if isinstance(out, tuple) else (out,)
        # the checkpoint has just packed these inputs: the cache hands back those handles
        handles = [self.pack(x) if isinstance(x, torch.Tensor) else x for x in inputs]
        group = _RecipeGroup(fn, handles, outs)
        for i, o in enumerate(outs):
            self.recipes[_storage_key(o)] = (group, i)
        return out

    def mark_fp8(self, *tensors: torch.Tensor) -> None:
        """Store these tensors (by storage) as FP8 tiles when saved."""
        if self.policy.fp8_storage:
            for t in tensors:
                self.fp8[_storage_key(t)] = weakref.ref(t)

    # hooks -----------------------------------------------------------------------------
    def pack(self, t: torch.Tensor) -> Any:
        """Decide how a tensor autograd saves is kept: as is, recipe, FP8 tiles or host copy."""
        key = _storage_key(t)
        if key in self.params:
            return t
        ckey = (key, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        hit = self.cache.get(ckey)
        if hit is not None and hit[0]() is t:
            return hit[1]
        kept = self._pack_new(t, key)
        self.cache[ckey] = (weakref.ref(t), kept)
        for m in _METERS:
            m.add(self.layer, kept)
        return kept

    def _pack_new(self, t: torch.Tensor, key: int) -> Any:
        rec = self.recipes.get(key)
        if rec is not None:
            group, i = rec
            base = group.outputs[i]()
            if base is not None and _storage_key(base) == key:
                group.pending += 1
                return _Recipe(group, i, t, base)
        role = self.experts.get(key)
        if role is not None:
            kept = self._pack_experts(t, *role)
            if kept is not None:
                return kept
        ref = self.fp8.get(key)
        if ref is not None and ref() is not None and t.is_floating_point():
            return fp8_quantize(t)
        if self.policy.cpu_offload:
            return self._offload(t)
        return t

    def on_experts_saved(self, saved: Any) -> None:
        """Note what an experts kernel announced it saves (k2_core.model.saved.ExpertsSaved)."""
        if not isinstance(saved, ExpertsSaved):
            return
        self.announced += 1
        routed = _SwiGLUParts(inter=saved.act.shape[1], weighted=True)
        roles = [(saved.h, "h", routed), (saved.act, "act", routed), (saved.ws, "ws", routed)]
        if saved.hs is not None:
            shared = _SwiGLUParts(inter=saved.acts.shape[1], weighted=False)
            roles += [(saved.hs, "h", shared), (saved.acts, "act", shared)]
        for t, name, parts in roles:
            self.experts[_storage_key(t)] = (name, parts)

    def _pack_experts(self, t: torch.Tensor, role: str, parts: _SwiGLUParts) -> Any:
        """The experts kernel's named tensors: pre-activations as FP8 (or plain), products
        deferred to the backward (rebuilt from the pre-activations), gate weights plain."""
        if role == "h":
            parts.h = fp8_quantize(t) if self.policy.fp8_storage else self._plain(t)
            return parts.h
        if role == "ws":
            parts.ws = self._plain(t)
            return parts.ws
        if role == "act" and self.policy.recompute:
            return _Deferred(parts)
        return None

    def _plain(self, t: torch.Tensor) -> Any:
        return self._offload(t) if self.policy.cpu_offload else t

    def _offload(self, t: torch.Tensor) -> _Offloaded:
        h = _Offloaded(t, self.stream)
        self.offloaded.append(h)
        return h

    def unpack(self, h: Any) -> torch.Tensor:
        """Bring a packed tensor back; the first one of a layer's backward also starts
        bringing back the previous layer's offloaded tensors (its backward comes next)."""
        if not self.unpacked:
            self.unpacked = True
            prev = self.prev() if self.prev is not None else None
            if prev is not None:
                for o in prev.offloaded:
                    o.prefetch()
        return _unpack(h)

    def close(self) -> None:
        """Forget what only the forward needed (the saved handles live in the graph)."""
        self.cache.clear()
        self.recipes.clear()
        self.fp8.clear()
        self.experts.clear()


def _active() -> _Session | None:
    return _SESSIONS[-1] if _SESSIONS and torch.is_grad_enabled() else None


@contextlib.contextmanager
def _session(sess: _Session) -> Iterator[_Session]:
    _SESSIONS.append(sess)
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(sess.pack, sess.unpack),
            listen_saved(sess.on_experts_saved),
        ):
            yield sess
    finally:
        _SESSIONS.pop()
        sess.close()


# --- patched forwards ---------------------------------------------------------------------


def _norm_forward(orig: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        s = _active()
        if s is None or not s.policy.recompute or not x.requires_grad:
            return orig(x)
        return s.region(orig, x)

    return forward


def _gated_forward(orig: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """SwiGLU's `gated` step (silu(g) * u): g and u stored as FP8, the product recomputed."""

    def gated(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        s = _active()
        if s is None:
            return orig(g, u)
        s.mark_fp8(g, u)
        if s.policy.recompute and g.requires_grad:
            return s.region(orig, g, u)
        return orig(g, u)

    return gated


def _expand_forward(orig: Callable[..., Any]) -> Callable[..., Any]:
    """MLA's `expand` step (up-projections through RoPE to q, k, v) as one recompute region."""

    def expand(
        cq: torch.Tensor,
        ckv: torch.Tensor,
        k_rot: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> Any:
        s = _active()
        if s is None or not s.policy.recompute or not (cq.requires_grad or ckv.requires_grad):
            return orig(cq, ckv, k_rot, cos, sin)
        return s.region(orig, cq, ckv, k_rot, cos, sin)

    return expand


# --- applying a policy --------------------------------------------------------------------


class PolicyHandle:
    """What `apply_activation_policy` changed on a model; `remove()` undoes it."""

    def __init__(self, model: nn.Module, policy: ActivationPolicy):
        self.model = model
        self.policy = policy
        self._patched: list[tuple[nn.Module, str]] = []
        self._hooks: list[Any] = []
        self.last: weakref.ref | None = None  # the latest layer session (prefetch chain)

    def patch(self, mod: nn.Module, forward: Callable[..., Any], name: str = "forward") -> None:
        """Shadow method `name` of `mod` with an instance attribute (state-dict names unchanged)."""
        setattr(mod, name, forward)
        self._patched.append((mod, name))

    def remove(self) -> None:
        """Restore the model's own methods and drop the hooks."""
        for mod, name in self._patched:
            if name in mod.__dict__:
                delattr(mod, name)
        for h in self._hooks:
            h.remove()
        self._patched.clear()
        self._hooks.clear()
        if getattr(self.model, "_k2_activation_policy", None) is self:
            del self.model._k2_activation_policy


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError("apply_activation_policy expects a K2ForCausalLM (model.model.layers)")
    return list(layers)


def _layer_forward(
    handle: PolicyHandle, layer: nn.Module, idx: int, orig: Callable[..., torch.Tensor]
) -> Callable[..., torch.Tensor]:
    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_grad_enabled() or not (handle.policy.active or _METERS):
            return orig(*args, **kwargs)
        params = {_storage_key(p) for p in layer.parameters()}
        params |= {_storage_key(b) for b in layer.buffers()}
        sess = _Session(handle.policy, idx, params, _side_stream(args))
        last = handle.last() if handle.last is not None else None
        if last is not None and last.layer == idx - 1:
            sess.prev = weakref.ref(last)
        handle.last = weakref.ref(sess)
        with _session(sess):
            return orig(*args, **kwargs)

    return forward


_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(args: tuple) -> torch.cuda.Stream | None:
    x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if x is None or x.device.type != "cuda":
        return None
    idx = x.device.index or 0
    if idx not in _STREAMS:
        _STREAMS[idx] = torch.cuda.Stream(device=x.device)
    return _STREAMS[idx]


def _moe_hooks(handle: PolicyHandle, mod: nn.Module) -> None:
    """Mark the MoE input for FP8; after the forward, check the experts kernel announced what
    it saved (without that, recompute and FP8 of its activations would silently not happen)."""

    before: list[int] = []  # announcements seen when the forward began (pre/post pair up)

    def pre(m: nn.Module, args: tuple) -> None:
        s = _active()
        if s is None:
            return
        s.mark_fp8(args[0])  # the MoE up-projection input
        before.append(s.announced)

    def post(m: nn.Module, args: tuple, out: Any) -> None:
        s = _active()
        if s is None or not before:
            return
        seen = before.pop()
        if s.announced == seen and (s.policy.recompute or s.policy.fp8_storage):
            raise RuntimeError(
                f"activation policy: the MoE layer {type(m).__name__} ran without its experts "
                "kernel announcing what it saves (k2_core.model.saved.announce_saved with an "
                "ExpertsSaved); recompute / fp8_storage cannot handle its activations"
            )

    handle._hooks.append(mod.register_forward_pre_hook(pre))
    handle._hooks.append(mod.register_forward_hook(post))


def apply_activation_policy(model: nn.Module, policy: ActivationPolicy | dict) -> PolicyHandle:
    """Apply `policy` to a K2ForCausalLM in place (replacing any earlier one); returns a handle."""
    from k2_core.model.attention import MLA
    from k2_core.model.layers import RMSNorm, SwiGLU

    try:
        policy = ActivationPolicy.model_validate(policy)
    except ValidationError as e:
        from k2_core.errors import ConfigError

        bad = ", ".join(".".join(map(str, err["loc"])) or "policy" for err in e.errors())
        raise ConfigError(
            f"activation policy: invalid {bad}; use the switches recompute, "
            "fp8_storage, cpu_offload (true/false)"
        ) from None
    old = getattr(model, "_k2_activation_policy", None)
    if old is not None:
        old.remove()
    handle = PolicyHandle(model, policy)
    for idx, layer in enumerate(_decoder_layers(model)):
        handle.patch(layer, _layer_forward(handle, layer, idx, layer.forward))
        for mod in layer.modules():
            if isinstance(mod, RMSNorm):
                handle.patch(mod, _norm_forward(mod.forward))
            elif isinstance(mod, MLA):
                handle.patch(mod, _expand_forward(mod.expand), "expand")
            elif isinstance(mod, SwiGLU):
                # the dense FFN; a shared expert only when run as a module (expert parallel)
                handle.patch(mod, _gated_forward(mod.gated), "gated")
        if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate"):
            _moe_hooks(handle, layer.mlp)
    model._k2_activation_policy = handle
    return handle


def measure_saved_bytes(model: nn.Module, fn: Callable[[], Any]) -> dict[int, SavedBytes]:
    """Run `fn` (a forward of `model`) and return, per decoder layer, the bytes it saved.

    Storages are counted once (the first layer that saves one owns it) and parameters not at
    all. Works with or without an applied policy; the policy's recipes count zero bytes.
    """
    temp = None
    if getattr(model, "_k2_activation_policy", None) is None:
        temp = apply_activation_policy(model, ActivationPolicy())
    meter = _Meter()
    _METERS.append(meter)
    try:
        out = fn()
    finally:
        _METERS.remove(meter)
        if temp is not None:
            temp.remove()
    del out
    return dict(sorted(meter.layers.items()))

"""Routed experts: sorted dispatch, fused gate/up matmul, a hand-written backward.

Dispatch sorts the (token, expert) pairs by expert once (one host read: the per-expert
counts) and runs each *active* expert on its contiguous slice of rows. Forward and backward
are one `torch.autograd.Function` (the optional shared expert included), so autograd records
a single node for all experts: the backward does exactly four matmuls per active expert
(the two forward ones are never redone) and keeps only the gate/up pre-activations
h [S, 2I], the gate-weighted activation [S, I] and the gate weights [S].

Two kernels:
- `loop` (CPU default): per expert, gather its rows into an L2-sized scratch buffer, run
  gate/up, SwiGLU, down, and index-add into the output while the rows are still in cache,
  with `torch.mm(..., out=)` into preallocated buffers; no [S, H] tensor is materialised in
  either direction. Measured faster on CPU than torch's grouped_mm (which, on CPU, also
  loops over experts but needs full [S, H] gathers).
- `grouped_mm` (CUDA default): full [S, .] buffers and `torch.nn.functional.grouped_mm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from k2_core.model.saved import ExpertsSaved, announce_saved
from k2_core.precision import autocast, host_counts
from torch import nn


def _has_grouped_mm() -> bool:
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(a, b, offs=offs)
    return torch._grouped_mm(a, b, offs=offs)


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """`auto` -> `loop` on CPU (measured faster there), `grouped_mm` on CUDA when available."""
    if kernel != "auto":
        return kernel
    if device.type == "cuda" and _has_grouped_mm():
        return "grouped_mm"
    return "loop"


class Dispatch:
    """The sort of (token, expert) pairs by expert, shared by forward and backward.

    - `perm` [S]: positions in the flattened [N*k] routing that land at each sorted row;
    - `token` [S]: the token of each sorted row (`perm // k`);
    - `counts` [E] (device tensor) and `splits` (the same as a Python list: the one host read);
    - `active`: (expert, start, end) of experts with at least one row.
    """

    __slots__ = ("perm", "token", "counts", "splits", "active", "offs", "n_tokens", "k")

    def __init__(self, topk_idx: torch.Tensor, n_experts: int):
        n_tokens, k = topk_idx.shape
        flat = topk_idx.reshape(-1)
        self.n_tokens, self.k = n_tokens, k
        self.perm = torch.argsort(flat, stable=True)
        self.token = torch.div(self.perm, k, rounding_mode="floor")
        # scatter_add rather than bincount: CUDA's bincount syncs with the host to size itself
        self.counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )
        self.splits = host_counts(self.counts, flat.numel())  # the single host sync per forward
        active, start = [], 0
        for e, c in enumerate(self.splits):
            if c:
                active.append((e, start, start + c))
            start += c
        self.active = active
        self.offs = None

    def offsets(self) -> torch.Tensor:
        """int32 cumulative counts (grouped_mm's `offs`)."""
        if self.offs is None:
            self.offs = torch.cumsum(self.counts, 0, dtype=torch.int32)
        return self.offs


def _swiglu_backward(
    g_act: torch.Tensor, h: torch.Tensor, inter: int, ws: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """From dL/d(act) (unscaled by ws) to dL/dh [S, 2I], and dL/dws when ws is given.

    act = silu(g) * u (* ws). Five elementwise passes; `g_act` is overwritten.
    """
    g, u = h[:, :inter], h[:, inter:]
    silu_g = F.silu(g)
    t = g_act * u
    d_ws = None
    if ws is not None:
        d_ws = torch.linalg.vecdot(t, silu_g)
        t.mul_(ws)
        g_act.mul_(ws)
    dh = torch.empty_like(h)
    torch.ops.aten.silu_backward.grad_input(t, g, grad_input=dh[:, :inter])
    torch.mul(g_act, silu_g, out=dh[:, inter:])
    return dh, d_ws


def _routed_forward_tiled(out, x, w_gate_up, w_down, ws, d: Dispatch):
    """Per active expert: gather its rows, gate/up, SwiGLU x ws, down, add into `out`.

    The [rows, H] gathered input and expert output live in L2-sized scratch buffers reused
    by every expert, so no [S, H] tensor is ever materialised; only h [S, 2I] and the
    activation [S, I] (both needed by the backward) are full-size.
    """
    s, inter = ws.shape[0], w_down.shape[-1]
    dt, dev = x.dtype, x.device
    h = torch.empty(s, 2 * inter, dtype=dt, device=dev)
    act = torch.empty(s, inter, dtype=dt, device=dev)
    rows = max((hi - lo for _, lo, hi in d.active), default=0)
    scratch_x = torch.empty(rows, x.shape[1], dtype=dt, device=dev)
    scratch_y = torch.empty(rows, x.shape[1], dtype=dt, device=dev)
    # per-expert views made by one split each (cheaper than slicing in the loop)
    sp = d.splits
    parts = zip(
        d.token.split(sp),
        h.split(sp),
        act.split(sp),
        ws.split(sp),
        w_gate_up.transpose(1, 2).unbind(0),
        w_down.transpose(1, 2).unbind(0),
        strict=True,
    )
    for n, (tok, he, ae, we, wgu, wd) in zip(sp, parts, strict=True):
        if n == 0:
            continue
        xs = torch.index_select(x, 0, tok, out=scratch_x[:n])
        torch.mm(xs, wgu, out=he)
        torch.mul(F.silu(he[:, :inter]), he[:, inter:], out=ae).mul_(we)
        out.index_add_(0, tok, torch.mm(ae, wd, out=scratch_y[:n]))
    return h, act


def _routed_forward_grouped(out, x, w_gate_up, w_down, ws, d: Dispatch):
    """The same with torch grouped_mm on full [S, .] buffers."""
    inter = w_down.shape[-1]
    xs = x.index_select(0, d.token)
    h = _grouped_mm(xs, w_gate_up.transpose(1, 2), d.offsets())
    del xs
    act = F.silu(h[:, :inter]).mul_(h[:, inter:]).mul_(ws)
    y = _grouped_mm(act, w_down.transpose(1, 2), d.offsets())
    out.index_add_(0, d.token, y)
    return h, act


def _routed_backward_tiled(
    dx, dout, x, w_gate_up, w_down, h, act, ws, d: Dispatch, need_wgu: bool, need_wd: bool
):
    """Per active expert, cache-resident: dy gather, down backward, SwiGLU backward, gate/up
    backward, input-gradient scatter. Returns (dW_gate_up, dW_down, d_ws [S])."""
    s, inter = h.shape[0], w_down.shape[-1]
    hidden = x.shape[1]
    dt, dev = h.dtype, h.device
    all_active = len(d.active) == w_down.shape[0]
    alloc = torch.empty if all_active else torch.zeros
    dw_gu = alloc(w_gate_up.shape, dtype=dt, device=dev) if need_wgu else None
    dw_d = alloc(w_down.shape, dtype=dt, device=dev) if need_wd else None
    d_ws = torch.empty(s, dtype=dt, device=dev)
    rows = max((hi - lo for _, lo, hi in d.active), default=0)
    scr_h = torch.empty(rows, hidden, dtype=dt, device=dev)
    scr_h2 = torch.empty(rows, hidden, dtype=dt, device=dev)
    scr_i = torch.empty(rows, inter, dtype=dt, device=dev)
    scr_i2 = torch.empty(rows, inter, dtype=dt, device=dev)
    scr_dh = torch.empty(rows, 2 * inter, dtype=dt, device=dev)
    sp = d.splits
    e_ids = range(len(sp))
    parts = zip(
        e_ids,
        sp,
        d.token.split(sp),
        h[:, :inter].split(sp),
        h[:, inter:].split(sp),
        act.split(sp),
        ws.split(sp),
        d_ws.split(sp),
        w_gate_up.unbind(0),
        w_down.unbind(0),
        strict=True,
    )
    for e, n, tok, g, u, ae, we, dwe, wgu, wd in parts:
        if n == 0:
            continue
        dy = torch.index_select(dout, 0, tok, out=scr_h[:n])
        g_act = torch.mm(dy, wd, out=scr_i[:n])
        if need_wd:
            torch.mm(dy.t(), ae, out=dw_d[e])
        silu_g = torch.nn.functional.silu(g)
        t = torch.mul(g_act, u, out=scr_i2[:n])
        torch.linalg.vecdot(t, silu_g, out=dwe)
        t.mul_(we)
        g_act.mul_(we)
        dh = scr_dh[:n]
        torch.ops.aten.silu_backward.grad_input(t, g, grad_input=dh[:, :inter])
        torch.mul(g_act, silu_g, out=dh[:, inter:])
        dx.index_add_(0, tok, torch.mm(dh, wgu, out=scr_h[:n]))
        if need_wgu:
            xs = torch.index_select(x, 0, tok, out=scr_h2[:n])
            torch.mm(dh.t(), xs, out=dw_gu[e])
    return dw_gu, dw_d, d_ws


def _routed_backward_grouped(
    dx, dout, x, w_gate_up, w_down, h, act, ws, d: Dispatch, need_wgu: bool, need_wd: bool
):
    inter = w_down.shape[-1]
    offs = d.offsets()
    all_active = len(d.active) == w_down.shape[0]
    dy = dout.index_select(0, d.token)
    g_act = _grouped_mm(dy, w_down, offs)
    dw_d = _grouped_mm(dy.t(), act, offs) if need_wd else None
    del dy
    dh, d_ws = _swiglu_backward(g_act, h, inter, ws)
    dxs = _grouped_mm(dh, w_gate_up, offs)
    dx.index_add_(0, d.token, dxs)
    del dxs
    dw_gu = None
    if need_wgu:
        dw_gu = _grouped_mm(dh.t(), x.index_select(0, d.token), offs)
    if not all_active:  # grouped_mm leaves groups with no rows unspecified
        idle = d.counts == 0
        for t in (dw_gu, dw_d):
            if t is not None:
                t[idle] = 0
    return dw_gu, dw_d, d_ws


class _ExpertsFn(torch.autograd.Function):
    """out[n] = shared(x_n) + sum_k w[n,k] * down_e(silu(gate_e(x_n)) * up_e(x_n)), e = idx[n,k].

    The shared expert (optional) runs as one more, always-on expert: its fused gate/up weight
    `s_gate_up` [2Is, H] and `s_down` [H, Is]; its output is the buffer the routed rows are
    index-added into, and its input gradient the buffer their input gradients are added into.
    Saved for backward: x, the weights, and an `ExpertsSaved` (k2_core.model.saved), announced
    by name for activation policies: h [S, 2I], the weighted activation [S, I], the gate
    weights [S, 1] (and the shared expert's h and activation); nothing is recomputed but the
    SwiGLU elementwise.
    """

    @staticmethod
    def forward(
        ctx, x, w_gate_up, w_down, topk_weight, s_gate_up, s_down, dispatch: Dispatch, kernel: str
    ):
        n, hidden = x.shape
        dt, dev = x.dtype, x.device
        ws = topk_weight.reshape(-1).index_select(0, dispatch.perm).to(dt).unsqueeze(1)  # [S, 1]
        if s_gate_up is not None:
            s_inter = s_down.shape[-1]
            hs = torch.mm(x, s_gate_up.t())
            acts = F.silu(hs[:, :s_inter]).mul_(hs[:, s_inter:])
            out = torch.mm(acts, s_down.t())
        else:
            hs = acts = None
            out = torch.zeros(n, hidden, dtype=dt, device=dev)
        routed = _routed_forward_grouped if kernel == "grouped_mm" else _routed_forward_tiled
        h, act = routed(out, x, w_gate_up, w_down, ws, dispatch)
        # named for activation policies (k2_core.model.saved): they store these by name
        saved = ExpertsSaved(h, act, ws, hs, acts)
        announce_saved(saved)
        ctx.save_for_backward(x, w_gate_up, w_down, s_gate_up, s_down, *saved)
        ctx.dispatch = dispatch
        ctx.kernel = kernel
        ctx.w_dtype = topk_weight.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w_gate_up, w_down, s_gate_up, s_down, *rest = ctx.saved_tensors
        h, act, ws, hs, acts = ExpertsSaved(*rest)
        d: Dispatch = ctx.dispatch
        need = ctx.needs_input_grad
        dout = dout.to(h.dtype).contiguous()

        ds_gate_up = ds_down = None
        if s_gate_up is not None:
            s_inter = s_down.shape[-1]
            gas = torch.mm(dout, s_down)
            ds_down = torch.mm(dout.t(), acts) if need[5] else None
            dhs, _ = _swiglu_backward(gas, hs, s_inter, None)
            dx = torch.mm(dhs, s_gate_up)
            ds_gate_up = torch.mm(dhs.t(), x) if need[4] else None
            del dhs, gas
        else:
            dx = torch.zeros_like(x)
        routed = _routed_backward_grouped if ctx.kernel == "grouped_mm" else _routed_backward_tiled
        dw_gate_up, dw_down, d_ws = routed(
            dx, dout, x, w_gate_up, w_down, h, act, ws, d, need[1], need[2]
        )
        d_w = None
        if need[3]:
            d_w = torch.empty(d.perm.numel(), dtype=ctx.w_dtype, device=h.device)
            d_w[d.perm] = d_ws.reshape(-1).to(ctx.w_dtype)
            d_w = d_w.view(d.n_tokens, d.k)
        return dx, dw_gate_up, dw_down, d_w, ds_gate_up, ds_down, None, None


def experts_forward(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weight: torch.Tensor,
    dispatch: Dispatch,
    *,
    shared: nn.Module | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Routed experts (plus an optional HF-named SwiGLU `shared` expert) on x [N, H].

    Under CPU/CUDA autocast, runs in the autocast dtype (weights cast once per call);
    otherwise in x's dtype. Returns [N, H] in that compute dtype.
    """
    dev = x.device.type
    s_gu = s_d = None
    if shared is not None:
        s_gu = torch.cat([shared.gate_proj.weight, shared.up_proj.weight], dim=0)
        s_d = shared.down_proj.weight
    if dev != "meta" and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    else:
        dt = w_gate_up.dtype
    x, w_gate_up, w_down = x.to(dt), w_gate_up.to(dt), w_down.to(dt)
    if s_gu is not None:
        s_gu, s_d = s_gu.to(dt), s_d.to(dt)
    kernel = resolve_kernel(kernel, x.device)
    with autocast(dev, enabled=False):
        return _ExpertsFn.apply(
            x.contiguous(), w_gate_up, w_down, topk_weight, s_gu, s_d, dispatch, kernel
        )


# Up to this many (token, expert) pairs, inference skips the dispatch sort: decoding one token
# per row is dominated by per-op overhead, not by matmuls.
SMALL_BATCH_PAIRS = 16


@torch.no_grad()
def small_batch_forward(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    on_host: bool | None = None,
) -> torch.Tensor:
    """Routed experts on a few tokens (inference): x [N, H] -> [N, H], no dispatch sort.

    `on_host` (default: on the CPU when no cast is needed) loops over the pairs on views of
    the weights; otherwise the chosen experts' weights are gathered for two batched matmuls,
    which needs no device sync."""
    n, k = topk_idx.shape
    dt = (
        torch.get_autocast_dtype(x.device.type)
        if torch.is_autocast_enabled(x.device.type)
        else w_gate_up.dtype
    )
    if on_host is None:
        on_host = x.device.type == "cpu" and w_gate_up.dtype == dt
    if on_host:
        return _pairs_on_host(x.to(dt), w_gate_up, w_down, topk_idx, topk_weight.to(dt))
    idx = topk_idx.reshape(-1)
    xs = x.to(dt).repeat_interleave(k, dim=0).unsqueeze(-1)  # [N*k, H, 1]
    with torch.autocast(x.device.type, enabled=False):
        h = torch.bmm(w_gate_up.index_select(0, idx).to(dt), xs).squeeze(-1)  # [N*k, 2I]
        inter = w_down.shape[-1]
        a = F.silu(h[:, :inter]) * h[:, inter:] * topk_weight.reshape(-1, 1).to(dt)
        y = torch.bmm(w_down.index_select(0, idx).to(dt), a.unsqueeze(-1))  # [N*k, H, 1]
    return y.view(n, k, -1).sum(dim=1)


def _pairs_on_host(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
) -> torch.Tensor:
    """One matrix-vector product per (token, expert) pair on views of the expert weights.

    On the CPU reading the ids costs no device sync, and it spares the gather above, which
    copies every chosen expert's weights (3x the memory traffic of the product itself)."""
    inter = w_down.shape[-1]
    out = torch.zeros_like(x)
    ids, weights = topk_idx.tolist(), topk_weight.tolist()
    for t, (row_ids, row_w) in enumerate(zip(ids, weights, strict=True)):
        xt, acc = x[t], out[t]
        for e, w in zip(row_ids, row_w, strict=True):
            h = torch.mv(w_gate_up[e], xt)
            a = F.silu(h[:inter]).mul_(h[inter:])
            acc.add_(torch.mv(w_down[e], a), alpha=w)
    return out


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D tensors with HF names and layout.

    `gate_up_proj` [E, 2*I, H] (gate rows, then up rows) and `down_proj` [E, H, I].
    """

    def __init__(
        self,
        n_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        initializer_range: float = 0.02,
        kernel: str = "auto",
    ):
        super().__init__()
        self.n_experts = n_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.initializer_range = initializer_range
        self.kernel = kernel
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        # Gate and up are two matrices fused for speed: Muon orthogonalises each block alone.
        self.gate_up_proj.muon_split = 2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range), as HF initialises expert weights."""
        nn.init.normal_(self.gate_up_proj, std=self.initializer_range)
        nn.init.normal_(self.down_proj, std=self.initializer_range)

    def extra_repr(self) -> str:
        return (
            f"experts={self.n_experts}, hidden={self.hidden_size}, inter={self.intermediate_size}"
        )

    def forward(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weight: torch.Tensor,
        dispatch: Dispatch | None = None,
    ) -> torch.Tensor:
        """x [N, H], topk_idx/topk_weight [N, k] -> [N, H] in x's dtype (or the autocast dtype)."""
        if dispatch is None:
            dispatch = Dispatch(topk_idx, self.n_experts)
        return experts_forward(
            x, self.gate_up_proj, self.down_proj, topk_weight, dispatch, kernel=self.kernel
        )

"""The parallel plan: pipeline (with virtual stages), expert and data parallel degrees and the
micro-batching for a model on a cluster, with per-GPU memory and an estimated step time.

The search covers power-of-two pipeline and expert degrees whose product (the model-parallel
group) divides the GPU count; data parallelism takes the rest. A candidate is feasible when
every pipeline rank's model state, ZeRO-1 optimizer shard, peak activations (under the
chosen activation policy) and the reserve fit in HBM and its offloaded activations fit in
host RAM. Among feasible candidates the smallest model-parallel group wins (the most data
parallelism, the fewest cross-node all-to-alls), then the shortest estimated step, then the
least memory. Memory figures come from `k2_hw_h800.memory`; the time model:

- FLOPs: 6 x (active parameters - embedding) per token plus causal attention
  3 x T x heads x (qk_dim + v_dim) per token and layer; recomputation adds the re-run MLA
  up-projections (counted in hardware FLOPs, not in MFU);
- compute time: FLOPs over GPUs x peak x matmul efficiency, times the slowest stage's share
  over the mean, times (1 + bubble) with the interleaved-1F1B bubble (pp - 1) / (v x m);
- EP all-to-all (dispatch + combine, forward and backward) over NVLink inside a node and the
  node's NICs across nodes; hidden behind compute under interleaving (v > 1), exposed if not;
- ZeRO-1 gradient reduce-scatter (FP32) and parameter all-gather (BF16) over the DP group,
  exposed at the end of the step; pipeline P2P sends, overlapped with compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from k2_core.config import ModelConfig, MoEConfig
from k2_core.errors import K2Error
from k2_core.params import count_parameters
from pydantic import BaseModel, ConfigDict, Field

from .activations import POLICY_LEVELS
from .cluster import GB, ClusterSpec
from .memory import SavedSplit, StageState, layer_activation_bytes, stage_state

PolicyName = Literal["auto", "none", "recompute", "recompute+fp8", "recompute+fp8+offload"]


class PlanError(K2Error):
    """A request no parallel layout can satisfy on the given cluster."""

    kind = "plan"


class PlanOptions(BaseModel):
    """What the planner is asked to plan for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seq_len: int = Field(4096, gt=0, description="Tokens per training sequence.")
    global_batch_tokens: int = Field(
        67_108_864, gt=0, description="Tokens per optimizer step over the whole job (K2: 67M)."
    )
    policy: PolicyName = Field(
        "auto", description="Activation policy; `auto` takes the least aggressive that fits."
    )
    pp: int | None = Field(None, gt=0, description="Force this pipeline degree.")
    ep: int | None = Field(None, gt=0, description="Force this expert-parallel degree.")
    virtual_stages: int | None = Field(
        None, gt=0, description="Force this many virtual pipeline stages per rank."
    )
    micro_batch_size: int | None = Field(
        None, gt=0, description="Force sequences per micro-batch (default: search 1, 2, 4, 8)."
    )
    master_weights: bool = Field(
        True,
        description="Keep an FP32 master copy of the parameters in the ZeRO-1 optimizer "
        "state, as the h800 backend's default dtype policy (bf16) does beside BF16 parameters "
        "and FP32 gradient buffers; False counts the optimizer's moments only.",
    )
    dispatch_bytes: int = Field(
        2, gt=0, description="Bytes per element of the EP dispatch/combine payload (BF16: 2)."
    )
    host_ram_fraction: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Fraction of host RAM per GPU usable for offloaded activations.",
    )
    max_virtual_stages: int = Field(8, gt=0, description="Largest virtual-stage count tried.")
    state_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Largest share of usable HBM the model state (BF16 "
        "parameters + FP32 gradient buffers) may take; the rest is kept for the optimizer shard "
        "and activations (K2: about 30 of 80 GB).",
    )


@dataclass
class Candidate:
    """One evaluated layout."""

    pp: int
    ep: int
    dp: int
    v: int
    mbs: int
    m: int
    policy: str
    chunks: list[list[int]]
    ranks: list[list[int]]
    states: list[StageState]
    act_mb: dict[str, list[SavedSplit]]
    act_peak: dict[str, list[SavedSplit]]
    totals: dict[str, list[float]]
    fits: dict[str, bool]
    state_over_gb: float
    over_gb: dict[str, float]
    host_over_gb: dict[str, float]
    time: dict[str, float] = field(default_factory=dict)

    @property
    def mp(self) -> int:
        """Model-parallel group size (pp x ep)."""
        return self.pp * self.ep

    def peak_gb(self) -> float:
        """The most HBM any rank needs under the chosen policy, GB."""
        return max(self.totals[self.policy]) / GB


def _pow2_upto(n: int) -> list[int]:
    out, x = [], 1
    while x <= n:
        out.append(x)
        x *= 2
    return out


def partition_layers(n_layers: int, pp: int, v: int) -> tuple[list[list[int]], list[list[int]]]:
    """Split layers into pp x v model chunks (chunk j on rank j % pp, interleaved order).

    Chunks get floor(L / (pp v)) layers; each remaining layer goes to a chunk of the rank with
    the fewest layers so far, preferring ranks that hold neither the embedding (rank 0) nor
    the head (rank pp - 1). Returns (chunks, per-rank layer lists).
    """
    n = pp * v
    if n > n_layers:
        raise ValueError(f"{n} model chunks for {n_layers} layers")
    base, rem = divmod(n_layers, n)
    sizes = [base] * n
    load = [base * v] * pp

    def key(j: int) -> tuple[int, int, int]:
        r = j % pp
        return (load[r], int(r in (0, pp - 1)) if pp > 1 else 0, j)

    for _ in range(rem):
        j = min((j for j in range(n) if sizes[j] == base), key=key)
        sizes[j] += 1
        load[j % pp] += 1
    chunks, start = [], 0
    for s in sizes:
        chunks.append(list(range(start, start + s)))
        start += s
    ranks = [[i for j in range(r, n, pp) for i in chunks[j]] for r in range(pp)]
    return chunks, ranks


def in_flight_chunks(pp: int, v: int, m: int, rank: int) -> int:
    """Chunk-forwards whose activations rank `rank` holds at its peak under (interleaved) 1F1B."""
    if v == 1:
        return min(pp - rank, m)
    return min((pp - rank - 1) * 2 + (v - 1) * pp + 1, m * v)


def model_flops_per_token(m: ModelConfig, moe: MoEConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding active parameters + causal attention."""
    counts = count_parameters(m, moe)
    dense = 6 * (counts["active"] - counts["embedding"])
    heads, layers = m.num_attention_heads, m.num_hidden_layers
    attn = 3 * seq_len * heads * (m.qk_head_dim + m.v_head_dim) * layers
    return float(dense + attn)


def _recompute_flops_per_token(m: ModelConfig) -> float:
    # the MLA up-projections (q_b_proj / kv_b_proj) run once more in the backward
    h = m.num_attention_heads
    qb = (m.q_lora_rank or m.hidden_size) * h * m.qk_head_dim
    kvb = m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
    return 2.0 * (qb + kvb) * m.num_hidden_layers


def _evaluate(
    m: ModelConfig,
    moe: MoEConfig,
    cl: ClusterSpec,
    o: PlanOptions,
    pp: int,
    ep: int,
    v: int,
    mbs: int,
) -> Candidate | None:
    gpus = cl.gpus
    dp = gpus // (pp * ep)
    seqs = o.global_batch_tokens // o.seq_len
    replicas = dp * ep  # attention and dense parts are data parallel over the EP group too
    # micro-batches per pipeline: the nearest count to the requested batch (a multiple of pp
    # under interleaving, as Megatron's schedule needs), so any node count gets a plan
    micro = max(1, round(seqs / (replicas * mbs)))
    if v > 1:
        micro = max(pp, round(micro / pp) * pp)
    if micro < pp or abs(micro * replicas * mbs - seqs) > 0.25 * seqs:
        return None
    chunks, ranks = partition_layers(m.num_hidden_layers, pp, v)
    tokens = mbs * o.seq_len
    states = [
        stage_state(
            m,
            moe,
            ranks[r],
            first=r == 0,
            last=r == pp - 1,
            ep=ep,
            dp=dp,
            master_weights=o.master_weights,
        )
        for r in range(pp)
    ]
    # the fused LM-head loss keeps grad_hidden [tokens, H] and an FP32 grad_weight [V, H]
    head_extra = SavedSplit(2.0 * tokens * m.hidden_size + 4.0 * m.vocab_size * m.hidden_size)
    usable = (cl.hbm_gb - cl.reserved_gb) * GB
    host_cap = cl.host_ram_per_gpu_gb * o.host_ram_fraction * GB
    act_mb: dict[str, list[SavedSplit]] = {}
    act_peak: dict[str, list[SavedSplit]] = {}
    totals: dict[str, list[float]] = {}
    fits: dict[str, bool] = {}
    over: dict[str, float] = {}
    host_over: dict[str, float] = {}
    for name, pol in POLICY_LEVELS.items():
        per_layer = {
            i: layer_activation_bytes(m, moe, i, tokens, pol) for i in range(m.num_hidden_layers)
        }
        mb, peak, tot = [], [], []
        for r in range(pp):
            a = SavedSplit(0.0)
            for i in ranks[r]:
                a = a + per_layer[i]
            mb.append(a)
            chunks_held = in_flight_chunks(pp, v, micro, r)
            p = a.scale(chunks_held / v)
            if pol.cpu_offload:
                # two layers' offloaded part are on the device at a time (one in use, one in
                # flight to or from the host)
                p = p + SavedSplit(2 * max(per_layer[i].host for i in ranks[r]))
            if r == pp - 1:
                p = p + head_extra
            peak.append(p)
            s = states[r]
            tot.append(s.model_state + s.optimizer + p.device)
        act_mb[name], act_peak[name], totals[name] = mb, peak, tot
        over[name] = max(t - usable for t in tot) / GB
        host_over[name] = max(p.host - host_cap for p in peak) / GB
        fits[name] = over[name] <= 0 and host_over[name] <= 0
    state_over = (
        max(st.model_state for st in states) / GB - (cl.hbm_gb - cl.reserved_gb) * o.state_fraction
    )
    if state_over > 0:
        fits = dict.fromkeys(fits, False)
    if o.policy == "auto":
        policy = next((n for n in POLICY_LEVELS if fits[n]), "recompute+fp8+offload")
    else:
        policy = o.policy
    cand = Candidate(
        pp,
        ep,
        dp,
        v,
        mbs,
        micro,
        policy,
        chunks,
        ranks,
        states,
        act_mb,
        act_peak,
        totals,
        fits,
        state_over,
        over,
        host_over,
    )
    cand.time = _time(m, moe, cl, o, cand)
    return cand


def _time(
    m: ModelConfig, moe: MoEConfig, cl: ClusterSpec, o: PlanOptions, c: Candidate
) -> dict[str, float]:
    tokens = float(c.m * c.mbs * c.dp * c.ep * o.seq_len)  # the batch actually planned
    model_flops = model_flops_per_token(m, moe, o.seq_len) * tokens
    hw_flops = model_flops
    if POLICY_LEVELS[c.policy].recompute:
        hw_flops += _recompute_flops_per_token(m) * tokens
    rate = cl.gpus * cl.peak_bf16_tflops * 1e12 * cl.matmul_efficiency
    loads = [len(layers) for layers in c.ranks]
    imbalance = max(loads) / (sum(loads) / len(loads))
    bubble = (c.pp - 1) / (c.v * c.m) if c.pp > 1 else 0.0
    compute = hw_flops / rate * imbalance * (1 + bubble)
    # EP all-to-all per GPU: each of its tokens goes (forward: dispatch and combine; backward:
    # their gradients) to the GPUs of its k experts; across nodes a token crosses the network
    # once per distinct remote node and fans out over NVLink there (DeepSeek-V3's scheme)
    moe_layers = max(sum(1 for i in r if i >= m.first_k_dense_replace) for r in c.ranks)
    k, h = moe.num_experts_per_tok, m.hidden_size
    tok_gpu = tokens / (c.dp * c.ep)
    payload = (o.dispatch_bytes + 2) * h * 2  # dispatch + combine, forward + backward
    if c.ep > 1:
        remote_gpus = k * (c.ep - 1) / c.ep
        nodes = max(1, c.ep // cl.gpus_per_node)
        remote_nodes = 0.0
        if nodes > 1:  # expected distinct nodes among k uniform picks, minus the own one
            remote_nodes = nodes * (1 - (1 - 1 / nodes) ** k) * (nodes - 1) / nodes
    else:
        remote_gpus = remote_nodes = 0.0
    a2a_total = tok_gpu * moe_layers * payload * remote_gpus
    a2a_net = tok_gpu * moe_layers * payload * remote_nodes
    in_node = a2a_total - a2a_net
    net_bw = cl.network_gbs_per_gpu * GB * cl.network_efficiency
    a2a_s = a2a_net / net_bw + in_node / (cl.nvlink_gbps * GB * cl.network_efficiency)
    a2a_exposed = max(0.0, a2a_s - compute) if c.v > 1 else a2a_s
    # pipeline P2P: hidden states forward and their gradients back, per chunk boundary
    p2p = 2.0 * c.m * c.v * c.mbs * o.seq_len * h * 2 if c.pp > 1 else 0.0
    p2p_s = p2p / net_bw
    p2p_exposed = max(0.0, p2p_s - compute)
    # ZeRO-1: reduce-scatter FP32 gradients and all-gather BF16 parameters, experts over DP,
    # the rest over EP x DP
    st = max(c.states, key=lambda x: x.params)
    dp_bytes = 0.0
    if c.dp * c.ep > 1:
        dp_bytes = (c.dp * c.ep - 1) / (c.dp * c.ep) * st.params * (4 + 2)
    dp_s = dp_bytes / net_bw
    # offloaded activations go out and come back over PCIe, which the NIC traffic shares
    # (each direction carries the offloaded bytes once: out in the forward, back in the backward)
    host = max(p.host for p in c.act_mb[c.policy]) * c.m
    pcie_s = (host + a2a_net + p2p + dp_bytes) / (cl.pcie_gbps * GB * cl.network_efficiency)
    pcie_exposed = max(0.0, pcie_s - compute - dp_s)
    step = compute + max(a2a_exposed + p2p_exposed, pcie_exposed) + dp_s
    return {
        "model_flops": model_flops,
        "hardware_flops": hw_flops,
        "compute_s": compute,
        "stage_imbalance": imbalance,
        "bubble_fraction": bubble,
        "a2a_gb_per_gpu": a2a_total / GB,
        "a2a_network_gb_per_gpu": a2a_net / GB,
        "a2a_s": a2a_s,
        "a2a_exposed_s": a2a_exposed,
        "pp_p2p_gb_per_gpu": p2p / GB,
        "pp_p2p_exposed_s": p2p_exposed,
        "dp_comm_gb_per_gpu": dp_bytes / GB,
        "dp_comm_s": dp_s,
        "offload_pcie_gb_per_gpu": host / GB,
        "pcie_s": pcie_s,
        "pcie_exposed_s": pcie_exposed,
        "step_s": step,
        "tokens_per_s": tokens / step,
        "mfu": model_flops / (step * cl.gpus * cl.peak_bf16_tflops * 1e12),
    }


@dataclass
class Plan:
    """The chosen layout and its report."""

    model_name: str
    model: ModelConfig
    moe: MoEConfig
    cluster: ClusterSpec
    options: PlanOptions
    best: Candidate
    considered: int

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (what `k2 plan --json` prints)."""
        c, cl = self.best, self.cluster
        counts = count_parameters(self.model, self.moe)
        worst = max(range(c.pp), key=lambda r: c.totals[c.policy][r])
        s = c.states[worst]

        def gb(x: float) -> float:
            return round(x / GB, 3)

        acts = {}
        for name in POLICY_LEVELS:
            mb, pk = c.act_mb[name][worst], c.act_peak[name][worst]
            acts[name] = {
                "per_microbatch_gb": gb(mb.device),
                "per_microbatch_host_gb": gb(mb.host),
                "peak_gb": gb(pk.device),
                "peak_host_gb": gb(pk.host),
                "total_gb": gb(c.totals[name][worst]),
                "fits": c.fits[name],
                "over_gb": round(c.over_gb[name], 3),
            }
        unique_state = counts["total"] * 6.0
        return {
            "model": self.model_name,
            "cluster": {
                "name": cl.name,
                "nodes": cl.nodes,
                "gpus": cl.gpus,
                "hbm_gb": cl.hbm_gb,
                "peak_bf16_tflops": cl.peak_bf16_tflops,
            },
            "parallel": {
                "pp": c.pp,
                "ep": c.ep,
                "dp": c.dp,
                "virtual_stages": c.v,
                "micro_batch_size": c.mbs,
                "micro_batches": c.m,
                "model_parallel_group": c.mp,
                "global_batch_sequences": c.m * c.mbs * c.dp * c.ep,
                "global_batch_tokens": c.m * c.mbs * c.dp * c.ep * self.options.seq_len,
                "seq_len": self.options.seq_len,
            },
            "layers_per_rank": [len(x) for x in c.ranks],
            "layers_per_chunk": [len(x) for x in c.chunks],
            "policy": c.policy,
            "params": {"total": counts["total"], "active": counts["active"]},
            "model_parallel_group_state_tb": {
                "bf16_params_plus_fp32_grads": round(unique_state / 1e12, 3),
                "with_replicated_layers": round(
                    sum(st.model_state for st in c.states) * c.ep / 1e12, 3
                ),
            },
            "per_gpu": {
                "rank": worst,
                "params": int(s.params),
                "bf16_params_gb": gb(s.bf16_params),
                "fp32_grads_gb": gb(s.fp32_grads),
                "model_state_gb": gb(s.model_state),
                "optimizer_zero1_gb": gb(s.optimizer),
                "checkpoint_share_gb": gb(s.checkpoint),
                "activations": acts,
                "total_gb": gb(c.totals[c.policy][worst]),
                "usable_hbm_gb": round(cl.hbm_gb - cl.reserved_gb, 3),
                "max_model_state_gb": gb(max(st.model_state for st in c.states)),
            },
            "time": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in c.time.items()},
            "candidates_considered": self.considered,
        }


def make_plan(
    model: ModelConfig,
    moe: MoEConfig,
    cluster: ClusterSpec,
    options: PlanOptions | None = None,
    model_name: str = "model",
) -> Plan:
    """The best feasible layout, or a PlanError naming what does not fit and by how much."""
    o = options or PlanOptions()
    gpus = cluster.gpus
    seqs = o.global_batch_tokens // o.seq_len
    if seqs < 1:
        raise PlanError(
            f"--global-batch-tokens {o.global_batch_tokens} is below one {o.seq_len}-token sequence"
        )
    pps = [o.pp] if o.pp else _pow2_upto(min(gpus, model.num_hidden_layers))
    eps = [o.ep] if o.ep else [e for e in _pow2_upto(gpus) if moe.n_routed_experts % e == 0]
    mbss = [o.micro_batch_size] if o.micro_batch_size else [1, 2, 4, 8]
    cands: list[Candidate] = []
    for pp in pps:
        for ep in eps:
            if gpus % (pp * ep) or moe.n_routed_experts % ep:
                continue
            vmax = model.num_hidden_layers // pp
            vs = (
                [o.virtual_stages]
                if o.virtual_stages
                else range(1, min(vmax, o.max_virtual_stages) + 1)
            )
            for v in vs:
                if pp * v > model.num_hidden_layers or (v > 1 and pp == 1):
                    continue
                for mbs in mbss:
                    c = _evaluate(model, moe, cluster, o, pp, ep, v, mbs)
                    if c is not None:
                        cands.append(c)
    where = f"{model_name} on {cluster.nodes} x {cluster.name} node(s) ({gpus} GPUs)"
    if not cands:
        raise PlanError(
            f"{where}: no pp x ep layout divides {gpus} GPUs and "
            f"{seqs} sequences per step into whole micro-batches; "
            "change --nodes, --global-batch-tokens or the forced degrees"
        )
    feasible = [c for c in cands if c.fits[c.policy]]
    if not feasible:
        raise PlanError(_infeasible(where, cands, o, cluster))
    best = min(feasible, key=lambda c: (c.mp, round(c.time["step_s"], 2), c.peak_gb(), -c.v))
    return Plan(model_name, model, moe, cluster, o, best, len(cands))


def _infeasible(where: str, cands: list[Candidate], o: PlanOptions, cl: ClusterSpec) -> str:
    """Say what does not fit for the closest layout, and by how much."""

    def miss(c: Candidate) -> float:
        return max(c.state_over_gb, c.over_gb[c.policy], c.host_over_gb[c.policy])

    c = min(cands, key=miss)
    name = c.policy
    r = max(range(c.pp), key=lambda i: c.totals[name][i])
    st = c.states[r]
    usable = cl.hbm_gb - cl.reserved_gb
    layout = f"PP{c.pp} x EP{c.ep} x DP{c.dp} (v={c.v}, micro-batch {c.mbs})"
    budget = usable * o.state_fraction
    if c.state_over_gb > 0:
        what = (
            f"model state (BF16 params + FP32 grads) needs {st.model_state / GB:.1f} GB per "
            f"GPU, {c.state_over_gb:.1f} GB over the {budget:.1f} GB ({o.state_fraction:.0%} "
            "of usable HBM) kept for it"
        )
    elif c.over_gb[name] > 0:
        what = (
            f"model state {st.model_state / GB:.1f} GB + optimizer {st.optimizer / GB:.1f} GB "
            f"+ activations ({name}) {c.act_peak[name][r].device / GB:.1f} GB per GPU exceed "
            f"the {usable:.1f} GB usable HBM by {c.over_gb[name]:.1f} GB"
        )
    else:
        what = (
            f"offloaded activations exceed the host RAM per GPU "
            f"({cl.host_ram_per_gpu_gb * o.host_ram_fraction:.0f} GB usable) by "
            f"{c.host_over_gb[name]:.1f} GB"
        )
    return (
        f"{where} does not fit: the closest layout {layout}: {what}; add nodes or shorten the batch"
    )


def plan_summary(p: Plan) -> str:
    """The report as text."""
    d = p.to_dict()
    par, g, t = d["parallel"], d["per_gpu"], d["time"]
    lines = [
        f"{d['model']} on {d['cluster']['nodes']} x {d['cluster']['name']} "
        f"({d['cluster']['gpus']} GPUs, {d['params']['total'] / 1e9:.1f}B params, "
        f"{d['params']['active'] / 1e9:.1f}B active)",
        f"parallel: PP{par['pp']} (virtual stages {par['virtual_stages']}) x EP{par['ep']} x "
        f"DP{par['dp']} (ZeRO-1); model-parallel group {par['model_parallel_group']} GPUs",
        f"micro-batching: {par['micro_batch_size']} x {par['seq_len']} tokens, "
        f"{par['micro_batches']} micro-batches per step per pipeline; layers per rank "
        f"{d['layers_per_rank']}",
        f"BF16 params + FP32 grads over the model-parallel group: "
        f"{d['model_parallel_group_state_tb']['bf16_params_plus_fp32_grads']:.2f} TB",
        f"per GPU (rank {g['rank']}, the fullest): BF16 params {g['bf16_params_gb']:.1f} GB, "
        f"FP32 grads {g['fp32_grads_gb']:.1f} GB (model state {g['model_state_gb']:.1f} GB), "
        f"ZeRO-1 optimizer {g['optimizer_zero1_gb']:.1f} GB",
        "activations per GPU    per micro-batch   peak (in flight)   host   total   fits",
    ]
    for name, a in g["activations"].items():
        mark = "<-" if name == d["policy"] else ""
        fits = "yes" if a["fits"] else "no"
        lines.append(
            f"  {name:22s} {a['per_microbatch_gb']:10.2f} GB {a['peak_gb']:12.2f} GB "
            f"{a['peak_host_gb']:8.1f} {a['total_gb']:7.1f} {fits:>5} {mark}"
        )
    lines += [
        f"usable HBM {g['usable_hbm_gb']:.1f} GB; chosen policy {d['policy']}: "
        f"{g['total_gb']:.1f} GB",
        f"step: {t['step_s']:.2f} s (compute {t['compute_s']:.2f} s, bubble "
        f"{100 * t['bubble_fraction']:.2f}%, stage imbalance {t['stage_imbalance']:.3f}, "
        f"EP all-to-all {t['a2a_gb_per_gpu']:.1f} GB/GPU "
        f"({t['a2a_network_gb_per_gpu']:.1f} GB over the network, {t['a2a_s']:.2f} s, "
        f"exposed {t['a2a_exposed_s']:.2f} s), ZeRO-1 "
        f"{t['dp_comm_s']:.2f} s)",
        f"throughput {t['tokens_per_s'] / 1e6:.2f}M tokens/s, MFU {100 * t['mfu']:.1f}%",
    ]
    return "\n".join(lines)


def human_tokens(text: str) -> int:
    """Parse 67M / 4k / 1.5G / 67108864 into tokens (K/M/G decimal; a value within 1% of a
    power of two is taken as that power, so K2's "67M" is 2^26 = 67,108,864)."""
    t = text.strip().upper()
    mult = {"K": 1e3, "M": 1e6, "G": 1e9}
    try:
        value = float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    except ValueError:
        raise PlanError(f"cannot read {text!r} as a token count; write e.g. 67M or 4096") from None
    if value < 1:
        raise PlanError(f"--global-batch-tokens must be positive, got {text!r}")
    p2 = 2 ** round(math.log2(value))
    return int(p2 if abs(p2 - value) <= 0.01 * value else round(value))

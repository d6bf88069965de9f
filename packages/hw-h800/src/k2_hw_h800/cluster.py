"""The cluster spec the planner sizes a job for: nodes of identical GPUs and their links."""

from __future__ import annotations

from k2_core.errors import ConfigError
from pydantic import BaseModel, ConfigDict, Field

GB = 1e9


class ClusterSpec(BaseModel):
    """A homogeneous GPU cluster: per-GPU memory and compute, per-node links and host RAM."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("custom", description="Name shown in plans (the preset's name).")
    nodes: int = Field(1, gt=0, description="Number of nodes.")
    gpus_per_node: int = Field(8, gt=0, description="GPUs in each node.")
    hbm_gb: float = Field(80.0, gt=0, description="HBM per GPU, in GB (1e9 bytes).")
    host_ram_gb: float = Field(2000.0, gt=0, description="Host RAM per node, in GB (1e9 bytes).")
    nvlink_gbps: float = Field(
        400.0, gt=0, description="NVLink bandwidth per GPU inside a node, GB/s, one direction."
    )
    nics_per_node: int = Field(8, gt=0, description="Network interfaces per node (one per GPU).")
    nic_gbit: float = Field(400.0, gt=0, description="Bandwidth of one network interface, Gbit/s.")
    pcie_gbps: float = Field(
        64.0,
        gt=0,
        description="Host-to-GPU PCIe bandwidth per GPU, GB/s, one direction; the "
        "GPU's NIC traffic (GPUDirect RDMA) crosses the same switch.",
    )
    peak_bf16_tflops: float = Field(
        989.0, gt=0, description="Dense BF16 tensor-core peak per GPU, TFLOP/s (no sparsity)."
    )
    matmul_efficiency: float = Field(
        0.6,
        gt=0,
        le=1,
        description="Fraction of the peak that large training GEMMs reach; "
        "the step-time estimate divides FLOPs by peak times this.",
    )
    network_efficiency: float = Field(
        0.7, gt=0, le=1, description="Fraction of the link bandwidth collectives reach."
    )
    reserved_gb: float = Field(
        6.0,
        ge=0,
        description="HBM per GPU kept for the CUDA context, NCCL buffers and "
        "allocator fragmentation, never planned for tensors.",
    )

    @property
    def gpus(self) -> int:
        """Total GPUs."""
        return self.nodes * self.gpus_per_node

    @property
    def network_gbs_per_gpu(self) -> float:
        """Inter-node bandwidth available to one GPU, GB/s (NICs shared by the node's GPUs)."""
        return self.nics_per_node * self.nic_gbit / 8.0 / self.gpus_per_node

    @property
    def host_ram_per_gpu_gb(self) -> float:
        """Host RAM one GPU's process can use for offloaded activations, GB."""
        return self.host_ram_gb / self.gpus_per_node


# Per-node figures: H800 as in the K2 report (NVLink cut to 400 GB/s, 8 x 400 Gbps RoCE);
# H100 SXM and H200 SXM as sold in 8-GPU HGX nodes with 8 x 400 Gbps NICs.
PRESETS: dict[str, dict] = {
    "h800": dict(
        hbm_gb=80.0, host_ram_gb=2000.0, nvlink_gbps=200.0, nic_gbit=400.0, peak_bf16_tflops=989.0
    ),
    "h100": dict(
        hbm_gb=80.0, host_ram_gb=2000.0, nvlink_gbps=450.0, nic_gbit=400.0, peak_bf16_tflops=989.0
    ),
    "h200": dict(
        hbm_gb=141.0, host_ram_gb=2000.0, nvlink_gbps=450.0, nic_gbit=400.0, peak_bf16_tflops=989.0
    ),
}


def cluster_preset(name: str, nodes: int = 1, **overrides: float) -> ClusterSpec:
    """The named preset (h800, h100, h200) with `nodes` nodes and any field overridden."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"--cluster {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    if nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {nodes}")
    return ClusterSpec(name=key, nodes=nodes, **{**PRESETS[key], **overrides})

"""Hardware and model profiles for `efedge simulate`, from published figures.

Every profile cites where its numbers come from (see also shared/reference/peers.md).
Decode on these machines is memory-bound, so compute time is modelled as bytes read over
memory bandwidth plus a fixed per-kernel overhead; transfers as bytes over the link's
measured (not nominal) rate plus a per-copy latency.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    link_bytes_per_s: float  # host → expert-cache memory, sustained
    link_latency_s: float  # per expert copy
    mem_bytes_per_s: float  # the compute device's memory bandwidth (decode is bound by it)
    fast_mem_bytes: float  # VRAM (or usable unified memory)
    kernel_overhead_s: float  # per launched matrix product
    source: str


@dataclass(frozen=True)
class ModelProfile:
    name: str
    n_layer: int  # MoE layers
    n_expert: int
    top_k: int
    bytes_per_expert: float  # at Q4_K_M, mean over layers
    non_expert_bytes_per_layer: float  # attention + router + norms + shared experts
    source: str


HARDWARE: dict[str, HardwareProfile] = {p.name: p for p in [
    HardwareProfile(
        "rtx4060-laptop", "RTX 4060 Laptop 8 GB, PCIe 4.0 x8", 12.5 * GB, 10e-6, 256 * GB,
        8 * GB, 8e-6,
        "VRAM and bus: nvidia.com laptop compare page (4060 Laptop 8 GB, 128-bit 16 Gbps "
        "GDDR6 = 256 GB/s, PCIe Gen4 x8); PCIe Gen4 measured ~25 GB/s at x16 (bam #54), "
        "halved for x8"),
    HardwareProfile(
        "rtx4050-laptop", "RTX 4050 Laptop 6 GB, PCIe 4.0 x8", 12.5 * GB, 10e-6, 192 * GB,
        6 * GB, 8e-6,
        "nvidia.com laptop compare page (4050 Laptop 6 GB, 96-bit 16 Gbps = 192 GB/s, "
        "Gen4 x8); PCIe as rtx4060-laptop"),
    HardwareProfile(
        "rtx3060-desktop", "RTX 3060 12 GB desktop, PCIe 4.0 x16", 20 * GB, 10e-6, 360 * GB,
        12 * GB, 8e-6,
        "NVIDIA RTX 3060 spec (192-bit 15 Gbps = 360 GB/s); PCIe Gen4 x16 ~20 GB/s "
        "single-stream measured (drkennetz/cuda_examples #1)"),
    HardwareProfile(
        "m2-16gb", "Apple M2 16 GB unified memory, experts streamed from the NVMe SSD",
        2.9 * GB, 80e-6, 100 * GB, 11 * GB, 10e-6,
        "Apple M2 spec (100 GB/s unified memory); Metal working set ~70% of RAM (peers.md: "
        "llama.cpp #5207, ollama #1576); MacBook Air M2 SSD ~2.9 GB/s sequential read "
        "(public reviews of the 512 GB model)"),
    HardwareProfile(
        "egpu-thunderbolt", "RTX 3060 12 GB in a Thunderbolt 3/4 enclosure (PCIe 3.0 x4)",
        2.8 * GB, 20e-6, 360 * GB, 12 * GB, 8e-6,
        "Thunderbolt 3/4 carries PCIe 3.0 x4 (~3.9 GB/s nominal, ~2.8 GB/s measured in eGPU "
        "reviews); GPU as rtx3060-desktop"),
]}

MODELS: dict[str, ModelProfile] = {p.name: p for p in [
    ModelProfile("mixtral-8x7b", 32, 8, 2, 106.6e6, 30e6,
                 "peers.md §4: 4096/14336, 8 experts top-2, 32 layers; 99.1–114.2 MB per "
                 "expert at Q4_K_M; attention 4096×(4096+2·1024+4096) at ~4.8 bpw"),
    ModelProfile("qwen3-30b-a3b", 48, 128, 8, 2.85e6, 11e6,
                 "peers.md §4: 2048/768, 128 experts top-8, 48 layers; 2.65–3.06 MB per "
                 "expert; attention 2048×(4096+2·512) + 4096×2048 at ~4.8 bpw"),
    ModelProfile("olmoe-1b-7b", 16, 64, 8, 3.81e6, 10e6,
                 "peers.md §4: 2048/1024, 64 experts top-8, 16 layers; 3.54–4.08 MB per "
                 "expert; attention 4·2048² at ~4.8 bpw"),
    ModelProfile("deepseek-v2-lite", 26, 64, 6, 5.77e6, 16e6,
                 "peers.md §4: 2048/1408, 64 routed (+2 shared) top-6, 27 layers with the "
                 "first dense; 5.23–6.31 MB per expert; MLA attention + 2 shared experts"),
    ModelProfile("gpt-oss-20b", 24, 32, 4, 13.2e6, 12e6,
                 "peers.md §4: 2880/2880, 32 experts top-4, 24 layers; ~13.2 MB per expert "
                 "in MXFP4; attention 2880×(4096+2·512)+4096×2880"),
    ModelProfile("granite-3.1-3b-a800m", 32, 40, 8, 1.45e6, 4e6,
                 "ibm-granite/granite-3.1-3b-a800m config.json: 1536/512, 40 experts top-8, "
                 "32 layers, 24 heads (8 kv) of 64; 3·1536·512 per expert at ~4.8 bpw ≈ 1.4 "
                 "MB (Q6_K down halves in Q4_K_M ≈ 1.45 MB); attention 1536×(1536+2·512+1536) "
                 "at ~4.8 bpw + an F32 router"),
]}


def get_hardware(name: str) -> HardwareProfile:
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware profile {name!r} (known: {', '.join(HARDWARE)})")
    return HARDWARE[name]


def get_model(name: str) -> ModelProfile:
    if name not in MODELS:
        raise ValueError(f"unknown model profile {name!r} (known: {', '.join(MODELS)})")
    return MODELS[name]

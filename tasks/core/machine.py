"""The CPU a measurement ran on: its model name and the ISA flags that decide which kernels engines pick."""

from __future__ import annotations

import platform
from pathlib import Path

# ISA extensions that decide which kernels an engine picks (int8 dot products, bf16/AMX tiles).
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def host_cpu() -> tuple[str, str | None]:
    """CPU model name and its inference-relevant ISA flags (Linux /proc/cpuinfo; elsewhere no flags)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return platform.processor() or platform.machine(), None
    fields = dict(line.split(":", 1) for line in info if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", platform.machine()), " ".join(f for f in CPU_FLAGS if f in flags)

"""The CPU flags every benchmark prints beside its figures (the speed of these kernels depends on them)."""

from __future__ import annotations

from pathlib import Path

FLAGS = ("amx_bf16", "avx512_bf16", "avx512_vnni", "avx2")


def cpu_flag_set() -> dict[str, bool]:
    """{flag: present} for FLAGS, from /proc/cpuinfo (Linux; all False elsewhere)."""
    try:
        line = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        line = ""
    present = set(line.split(":", 1)[1].split()) if ":" in line else set()
    return {f: f in present for f in FLAGS}


def cpu_flags() -> str:
    """'amx_bf16=0 avx512_bf16=0 avx512_vnni=0 avx2=1'."""
    return " ".join(f"{f}={int(v)}" for f, v in cpu_flag_set().items())

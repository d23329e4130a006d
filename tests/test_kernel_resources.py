"""tools/kernel_resources.py's reading of ptxas -v (the registers / spills / shared memory table, no GPU needed)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from kernel_resources import launch_table, parse_ptxas  # noqa: E402

REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gemv_add_q4_k' for 'sm_90a'
ptxas info    : Function properties for gemv_add_q4_k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 128 bytes smem, 440 bytes cmem[0]
ptxas info    : Compiling entry function 'dca_flash_128_2_64' for 'sm_90a'
ptxas info    : Function properties for dca_flash_128_2_64
    432 bytes stack frame, 428 bytes spill stores, 380 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 432 bytes cumulative stack size, 464 bytes cmem[0]
"""


def test_ptxas_report_is_read_per_entry_function():
    assert parse_ptxas(REPORT) == [
        {"kernel": "gemv_add_q4_k", "regs": 64, "spill_stores": 0, "spill_loads": 0, "static_smem": 128},
        {"kernel": "dca_flash_128_2_64", "regs": 255, "spill_stores": 428, "spill_loads": 380, "static_smem": 0}]


def test_decode_launches_at_8b_widths():
    """The staged input of an int8 GEMV is cols + cols/4 bytes (d 4096: 5,120; ffn 14,336: 17,920)."""
    smem = {r["launch"]: r["dyn_smem"] for r in launch_table("llama3-8b")}
    assert smem["qkv (Q4_K)"] == 5120 and smem["gemv_add down (Q4_K)"] == 17920
    assert all(0 < v <= 232448 for v in smem.values())  # Hopper's opt-in limit per block

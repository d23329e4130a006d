"""dev/cuda/ncu_report.py: Nsight Compute's raw CSV to one line a kernel (no GPU: a CSV written here)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ncu_report():
    spec = importlib.util.spec_from_file_location("ncu_report", ROOT / "dev" / "cuda" / "ncu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","dram__bytes_read.sum","gpu__time_duration.sum","launch__grid_size",'
          '"launch__registers_per_thread","sm__cycles_active.avg","sm__cycles_elapsed.avg",'
          '"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",'
          '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",'
          '"smsp__average_warps_issue_stalled_long_scoreboard_not_issued_per_issue_active.ratio",'
          '"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"')
UNITS = '"","","","","","","","","","","","byte","nsecond","","register/thread","cycle","cycle","ratio","ratio","ratio","ratio"'


def test_a_kernel_line_from_the_raw_page(ncu_report, tmp_path):
    raw = tmp_path / "raw.csv"
    raw.write_text("==PROF== Connected to process 1\n" + HEADER + "\n" + UNITS + "\n"
                   '"0","1","python3","h","qkv_q4_k","1","7","(256, 1, 1)","(235, 1, 1)","0","9.0",'
                   '"14,200,000","10,000","235","120","6000","10000","0.50","3.25","9.00","0.75"\n'
                   '"1","1","python3","h","gateup_q4_k","1","7","(256, 1, 1)","(264, 1, 1)","0","9.0",'
                   '"66000000","25000","264","105","n/a","20000","1.5","2","0","0.1"\n')
    rows = ncu_report.read_raw(raw)
    assert [r["Kernel Name"][0] for r in rows] == ["qkv_q4_k", "gateup_q4_k"]
    qkv, gateup = (ncu_report.summarize(r, 2) for r in rows)
    assert qkv["dram_read_TBps"] == pytest.approx(14.2e6 / 10e-6 / 1e12)  # 1.42 TB/s
    assert qkv["sm_active_pct"] == pytest.approx(60.0)
    assert qkv["registers"] == 120 and qkv["grid"] == 235
    assert list(qkv["stalls"]) == ["long_scoreboard", "wait"]  # the not_issued variant left out, top 2 of 3
    assert gateup["sm_active_pct"] is None and gateup["dram_pct"] is None  # absent or n/a: "-"
    text = ncu_report.table([qkv, gateup])
    assert "| qkv_q4_k | 235 | 120 | 10.00 | 14.20 | 1.42 | - | 60.0 |" in text
    assert "long_scoreboard 3.25, wait 0.75" in text


def test_pc_sampling_counts_when_the_ratios_are_absent(ncu_report, tmp_path):
    raw = tmp_path / "raw.csv"
    raw.write_text('"ID","Kernel Name","smsp__pcsamp_warps_issue_stalled_barrier",'
                   '"smsp__pcsamp_warps_issue_stalled_long_scoreboard","smsp__pcsamp_warps_issue_stalled_selected"\n'
                   '"","","","",""\n"0","dca_combine","25","70","5"\n')
    (combine,) = (ncu_report.summarize(r, 3) for r in ncu_report.read_raw(raw))
    assert combine["stall_kind"] == "% of samples"
    assert combine["stalls"] == pytest.approx({"long_scoreboard": 70.0, "barrier": 25.0, "selected": 5.0})


def test_a_file_without_the_raw_header_is_one_clear_error(ncu_report, tmp_path):
    raw = tmp_path / "raw.csv"
    raw.write_text("==ERROR== the profiler could not read the counters\n")
    with pytest.raises(SystemExit, match="no raw-page header"):
        ncu_report.read_raw(raw)


def test_the_short_unit_names_of_nsight_compute_2025(ncu_report):
    # Nsight Compute 2025.3 prints "ns" for gpu__time_duration with --print-units base (seen on the H100).
    assert ncu_report.number("18,592", "ns") == pytest.approx(18.592e-6)
    assert ncu_report.number("1.5", "us") == pytest.approx(1.5e-6)
    assert ncu_report.number("14,245,888", "byte") == 14245888

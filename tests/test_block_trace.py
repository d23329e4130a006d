"""dev/cuda/block_trace.py's reading of a block trace (no GPU: records written here as the patched kernels would)."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLOCK = 1.5  # cycles a ns


@pytest.fixture(scope="module")
def block_trace():
    spec = importlib.util.spec_from_file_location("block_trace", ROOT / "dev" / "cuda" / "block_trace.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def record(grid, kind, sm, block, start, waited, end, grid_size, cycle0=10_000):
    """One block's words: times in ns; its SM's cycle counter starts anywhere (cycle0)."""
    cycles = lambda t: cycle0 + int((t - start) * CLOCK)  # noqa: E731
    return [grid, (kind << 48) | (sm << 32) | block, start, end, cycles(start),
            0 if waited is None else cycles(waited), cycles(end), grid_size]


def layer(grid0, t0):
    """qkv (2 blocks, one 2 us longer), decode, combine, o, gateup, down; each starts 1 us before the last ends."""
    recs, t = [], t0
    for i, kind in enumerate((3, 7, 8, 2, 4, 2)):
        start = t - 1000
        recs.append(record(grid0 + i, kind, 0, 0, start, start + 1500, start + 6000, 2))
        recs.append(record(grid0 + i, kind, 1, 1, start + 200, start + 1500, start + 8000 if kind == 3 else start + 6000,
                           2, cycle0=77))
        t = max(r[3] for r in recs[-2:])
    return recs, t


def test_a_step_read_back_into_launches_and_figures(block_trace):
    recs0, t = layer(100, 1_000_000)
    recs1, _ = layer(200, t)
    words = np.array(recs1 + recs0, np.uint64).ravel()  # blocks arrive in any order
    recs = block_trace.records(words, len(recs0) + len(recs1))
    assert block_trace.cycles_per_ns(recs) == pytest.approx(CLOCK)
    seq = block_trace.launches(recs)
    names = block_trace.labels(seq)
    assert names == ["qkv", "dca_decode", "dca_combine", "o", "gateup", "down"] * 2
    figures = block_trace.rows(seq)
    qkv, decode = figures[6], figures[7]  # the second layer's (the first has no kernel before it)
    assert qkv["ramp"] == pytest.approx(-1.0)  # started 1 us before down's last block ended
    assert qkv["go"] == pytest.approx(0.5)  # its first block past the wait 1.5 us after its start
    assert qkv["wait"] == pytest.approx(1.5 - 0.1)  # median of 1.5 and 1.3 us
    assert qkv["body_max"] == pytest.approx(6.5) and qkv["tail"] == pytest.approx(1.0)
    assert qkv["span"] == pytest.approx(7.0) and decode["span"] == pytest.approx(5.0)
    assert qkv["last"] == pytest.approx(-0.8) and qkv["late%"] == 0.0  # both blocks resident before down ended
    assert qkv["blocks"] == "2/2" and qkv["sms"] == "2x1"
    order, medians = block_trace.per_kind_medians(names, figures)
    assert order == ["qkv", "dca_decode", "dca_combine", "o", "gateup", "down"]
    assert medians[1]["span"] == pytest.approx(5.0)
    text = block_trace.table(order, medians)
    assert text.splitlines()[2].startswith("| qkv | 2/2 | (2 launches) 2x1 |")


def test_blocks_that_start_after_the_kernel_before_are_counted_late(block_trace):
    before = [record(1, 4, 0, 0, 0, 100, 5000, 1)]  # gateup, ending at 5 us
    o = [record(2, 2, s, s, start, start + 300, start + 3000, 4) for s, start in enumerate((4000, 4500, 6000, 7000))]
    seq = block_trace.launches(block_trace.records(np.array(before + o, np.uint64).ravel(), 5))
    figures = block_trace.rows(seq)
    assert figures[1]["late%"] == pytest.approx(50.0) and figures[1]["last"] == pytest.approx(2.0)


def test_a_block_that_never_waited_counts_its_whole_time_as_body(block_trace):
    recs = block_trace.records(np.array([record(5, 7, 3, 0, 0, None, 4000, 1)], np.uint64).ravel(), 1)
    (launch,) = block_trace.launches(recs)
    assert launch.wait_ns[0] == 0.0 and launch.body_ns[0] == pytest.approx(4000.0)


def test_too_short_a_trace_to_tell_the_clock_is_one_clear_error(block_trace):
    recs = block_trace.records(np.array([record(5, 7, 3, 0, 0, 100, 500, 1)], np.uint64).ravel(), 1)
    with pytest.raises(SystemExit, match="SM clock"):
        block_trace.launches(recs)

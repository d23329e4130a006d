"""tools/compare_llama_cpp.py: engine bench and llama-bench paired per test, on the CPU with a stand-in llama-bench
(a script that answers as llama-bench -o json does) and a tiny model."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from compare_llama_cpp import invocations, paired, table  # noqa: E402
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402

FAKE_LLAMA_BENCH = '''#!{python}
import json, sys
a = sys.argv
arg = lambda flag, default: a[a.index(flag) + 1] if flag in a else default
prompts = [int(p) for p in arg("-p", "512").split(",")]
gen, depths = int(arg("-n", "128")), [int(d) for d in arg("-d", "0").split(",")]
assert arg("-o", "") == "json" and arg("-fa", "") == "1"
slower = 2.0 if arg("-ctk", "f16") == "q8_0" and arg("-ctv", "f16") == "q8_0" else 1.0  # shows the types arrived
runs = float(arg("-r", "5"))  # the stand-in's spread: its number of runs, so the tests see what each test got
rows = [dict(n_prompt=p, n_gen=0, n_depth=0, avg_ts=(1000.0 + p) / slower, stddev_ts=runs) for p in prompts if p] + \\
       [dict(n_prompt=0, n_gen=gen, n_depth=d, avg_ts=(100.0 - d / 64) / slower, stddev_ts=runs) for d in depths if gen]
print(json.dumps(rows))
'''


def test_rows_pair_by_test_and_depth():
    engine = [dict(test="pp512", tokens=512, depth=0, tokens_per_s=3000.0, sd=5.0),
              dict(test="tg128", tokens=128, depth=512, tokens_per_s=150.0, sd=1.0),
              dict(test="tg128", tokens=128, depth=8192, tokens_per_s=120.0, sd=1.0)]
    llama = [dict(n_prompt=512, n_gen=0, n_depth=0, avg_ts=1000.0, stddev_ts=9.0),
             dict(n_prompt=0, n_gen=128, n_depth=512, avg_ts=100.0, stddev_ts=1.0),
             dict(n_prompt=0, n_gen=128, n_depth=0, avg_ts=999.0, stddev_ts=1.0)]  # another depth: not paired
    rows = paired(engine, llama)
    assert [r["ratio"] for r in rows] == [3.0, 1.5, None]
    text = table("m", rows)
    assert "| | pp512 | 0 | 3,000.0 ± 5.0 | 1,000.0 ± 9.0 | 3.00x |" in text
    assert "| | tg128 | 8192 | 120.0 ± 1.0 | - | - |" in text


def run_tool(tmp_path, spec: TinySpec, *options: str) -> tuple[list[dict], str]:
    """compare_llama_cpp.py on a tiny model (CPU) against the stand-in llama-bench: (the model's JSON rows, stdout)."""
    model = make_tiny_model(tmp_path, spec, gguf_types=("f32",), hf=False)["f32"]
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "compare_llama_cpp.py"), "--llama-bench", str(fake),
                           "-m", str(model), "--device", "cpu", "--dtype", "auto", "-p", "32", "-n", "4", "-r", "1",
                           "--prompt-repetitions", "3",
                           "--json", str(out), *options], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())[str(model)], done.stdout


def test_the_tool_runs_both_programs_on_the_same_file(tmp_path):
    rows, stdout = run_tool(tmp_path, TinySpec(seed=3), "-d", "16,48")
    assert [(r["test"], r["depth"]) for r in rows] == [("pp32", 0), ("tg4", 16), ("tg4", 48)]
    assert [r["llama_cpp"] for r in rows] == [1032.0, 99.75, 99.25]
    # the prompt test ran --prompt-repetitions times on both sides, the generation tests -r times
    assert [(r["runs"], r["llama_cpp_sd"]) for r in rows] == [(3, 3.0), (1, 1.0), (1, 1.0)]
    assert all(r["engine"] > 0 and abs(r["ratio"] - r["engine"] / r["llama_cpp"]) < 1e-12 for r in rows)
    assert "| | tg4 | 48 |" in stdout


def test_cache_types_reach_both_programs(tmp_path, monkeypatch):
    """-ctk / -ctv go to engine bench and to llama-bench alike (the stand-in halves its figures when both are q8_0;
    engine bench refuses a type it does not know, so its rows prove it ran with them), and the table names them."""
    rows, stdout = run_tool(tmp_path, TinySpec(d_model=128, seed=4),  # heads of 32 values (q8_0's block)
                            "-d", "16", "-ctk", "q8_0", "-ctv", "q8_0")
    assert [r["llama_cpp"] for r in rows] == [516.0, 49.875]
    assert "(KV cache q8_0/q8_0)" in stdout
    import compare_llama_cpp
    calls = []
    monkeypatch.setattr(compare_llama_cpp.subprocess, "run", lambda command, **kw: calls.append(command) or
                        SimpleNamespace(returncode=0, stdout=json.dumps({"results": []}) if "engine.bench" in command
                                        else "[]"))
    compare_llama_cpp.engine_rows("m.gguf", "cuda", "bf16", "512", 128, "512", 1, 5, ["-ctk", "q8_0", "-ctv", "q8_0"])
    compare_llama_cpp.llama_rows("lb", "m.gguf", "cuda", "512", 128, "512", 1, 5, ["-ctk", "q8_0", "-ctv", "q8_0"])
    assert all(c[c.index("-ctk") + 1] == "q8_0" and c[c.index("-ctv") + 1] == "q8_0" for c in calls)
    assert len(calls) == 4  # each program twice: the prompt tests, then the generation tests


def test_each_program_runs_the_prompt_then_the_generation_tests_and_skips_what_is_zero():
    assert invocations("512,8192", 128, "512,8192", 2, 5) == [["-p", "512,8192", "-n", "0", "-r", "5"],
                                                              ["-p", "0", "-n", "128", "-d", "512,8192", "-r", "2"]]
    assert invocations("0", 128, "512", 2, 5) == [["-p", "0", "-n", "128", "-d", "512", "-r", "2"]]
    assert invocations("512", 0, "512", 2, 5) == [["-p", "512", "-n", "0", "-r", "5"]]

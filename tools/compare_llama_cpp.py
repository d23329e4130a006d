"""Side-by-side speed against llama.cpp: engine bench and llama-bench on the same GGUF files, same machine, one
table with the ratio per test (the way every speed claim in docs/results.md is made).

    python tools/compare_llama_cpp.py --llama-bench PATH -m llama3-8b.gguf [-m llama2-7b.gguf ...] \\
        [--device cuda] [--dtype bf16] [-p 512,8192] [-n 128] [-d 512,8192,32768] [-r 2] [--prompt-repetitions 5]
        [-ctk q8_0 -ctv q8_0] [--json FILE]

Tests: ppN after an empty context for each -p, tgN after each -d tokens (both programs get the same depths). The
prompt tests run --prompt-repetitions times on both sides, the generation tests -r times: a 512-token prompt takes a
few milliseconds, and such short runs spread most (session 19: llama-bench's pp512 +-25% over two runs).
llama-bench runs with -fa 1 (flash attention) and, on CUDA, -ngl 99 (every layer on the GPU). -ctk / -ctv give both
programs the same KV cache types (llama.cpp's names); without them each keeps its own 16-bit default (the engine's
activation dtype, llama.cpp's f16). The random-weight
GGUFs of real models' shapes come from `engine bench --shape NAME --save-gguf FILE` or ../shared/bench/synth_gguf.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cache_flags(cache_k: str | None, cache_v: str | None) -> list[str]:
    """-ctk / -ctv as both programs take them (nothing for a type left to the program's default)."""
    return (["-ctk", cache_k] if cache_k else []) + (["-ctv", cache_v] if cache_v else [])


def invocations(prompts: str, gen: int, depths: str, reps: int, prompt_reps: int) -> list[list[str]]:
    """The options of each program's runs: the prompt tests (prompt_reps runs), then the generation tests at each
    depth (reps runs); a run with no test left (-p 0, -n 0: llama-bench's "none") is dropped."""
    runs = []
    if any(p.strip().lstrip("0") for p in prompts.split(",")):  # a length but 0 (the programs check the rest)
        runs.append(["-p", prompts, "-n", "0", "-r", str(prompt_reps)])
    if gen > 0:
        runs.append(["-p", "0", "-n", str(gen), "-d", depths, "-r", str(reps)])
    return runs


def engine_rows(model: str, device: str, dtype: str, prompts: str, gen: int, depths: str, reps: int,
                prompt_reps: int, cache: list[str] = ()) -> list[dict]:
    """engine bench --json on one file, the prompt tests (prompt_reps runs) then the generation tests at each depth
    (reps runs) -> its result rows (test, tokens, depth, tokens_per_s, sd, runs)."""
    common = [sys.executable, "-m", "engine.bench", "-m", model, "--device", device, "--dtype", dtype, "--no-hf",
              "--json", *cache]
    rows = []
    for extra in invocations(prompts, gen, depths, reps, prompt_reps):
        done = subprocess.run(common + extra, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"engine bench failed on {model}:\n{done.stderr.strip()}")
        rows += json.loads(done.stdout)["results"]
    return rows


def llama_rows(llama_bench: str, model: str, device: str, prompts: str, gen: int, depths: str,
               reps: int, prompt_reps: int, cache: list[str] = ()) -> list[dict]:
    """llama-bench -o json on one file: the prompt tests (prompt_reps runs), then the generation tests at each depth
    (reps runs)."""
    common = [llama_bench, "-m", model, "-fa", "1", "-o", "json", *cache]
    common += ["-ngl", "99"] if device == "cuda" else ["-ngl", "0"]
    rows = []
    for extra in invocations(prompts, gen, depths, reps, prompt_reps):
        done = subprocess.run(common + extra, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"llama-bench failed on {model}:\n{done.stderr.strip()[-2000:]}")
        rows += json.loads(done.stdout)
    return rows


def paired(engine: list[dict], llama: list[dict]) -> list[dict]:
    """One row per engine test with llama.cpp's figure for the same test: ppN at depth 0 <-> (n_prompt N, n_gen 0),
    tgN at depth d <-> (n_prompt 0, n_gen N, n_depth d); None where llama.cpp has no such test."""
    by_test = {}
    for row in llama:
        kind = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
        by_test[(kind, row.get("n_depth", 0) if row["n_gen"] else 0)] = (row["avg_ts"], row["stddev_ts"])
    out = []
    for row in engine:
        peer = by_test.get((row["test"], row["depth"] if row["test"].startswith("tg") else 0))
        out.append(dict(test=row["test"], depth=row["depth"], runs=row.get("runs"), engine=row["tokens_per_s"],
                        engine_sd=row["sd"], llama_cpp=peer[0] if peer else None, llama_cpp_sd=peer[1] if peer else None,
                        ratio=row["tokens_per_s"] / peer[0] if peer else None))
    return out


def table(label: str, rows: list[dict]) -> str:
    lines = [f"| {label} | test | depth | engine tokens/s | llama.cpp tokens/s | engine / llama.cpp |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peer = f"{r['llama_cpp']:,.1f} ± {r['llama_cpp_sd']:,.1f}" if r["llama_cpp"] is not None else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        engine = f"{r['engine']:,.1f} ± {r['engine_sd']:,.1f}"
        lines.append(f"| | {r['test']} | {r['depth']} | {engine} | {peer} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bench", required=True, help="path of llama.cpp's llama-bench binary")
    ap.add_argument("-m", "--model", action="append", required=True, help="GGUF file (repeatable)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default="bf16", help="the engine's activation dtype on CUDA")
    ap.add_argument("-p", "--n-prompt", default="512,8192")
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-d", "--depth", default="512,8192,32768")
    ap.add_argument("-r", "--repetitions", type=int, default=2, help="runs of each generation test")
    ap.add_argument("--prompt-repetitions", type=int, default=5, help="runs of each prompt test")
    ap.add_argument("-ctk", "--cache-type-k", help="both programs' K cache type (f16, q8_0, ...)")
    ap.add_argument("-ctv", "--cache-type-v", help="both programs' V cache type")
    ap.add_argument("--json", type=Path, help="also write every row as JSON")
    args = ap.parse_args()
    cache = cache_flags(args.cache_type_k, args.cache_type_v)
    label = f" (KV cache {args.cache_type_k or 'default'}/{args.cache_type_v or 'default'})" if cache else ""
    results = {}
    for model in args.model:
        rows = paired(engine_rows(model, args.device, args.dtype, args.n_prompt, args.n_gen, args.depth,
                                  args.repetitions, args.prompt_repetitions, cache),
                      llama_rows(args.llama_bench, model, args.device, args.n_prompt, args.n_gen, args.depth,
                                 args.repetitions, args.prompt_repetitions, cache))
        results[model] = rows
        print(table(Path(model).stem + label, rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

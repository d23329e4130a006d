"""Peak RSS and speed of the CPU backend, float32 copies vs weights as stored, one fresh process per run.

    python tools/cpu_memory_bench.py [MODEL.gguf | --shape llama-3.2-1b] [--prompt 512] [--decode 8]
                                     [--copies auto,on,off] [--context 1024]

--shape writes a GGUF of random weights with that model's shapes (Q4_K matrices, Q6_K embedding) into
/tmp with the engine's own writer (engine/convert/synthetic.py; vocabulary of the default model) first.
Each run loads the model (f32_copies True/False/None = auto), prefills --prompt random tokens, greedily
decodes --decode tokens, and prints one line: the plan's total, peak RSS (getrusage), load, prefill and
decode speed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine

SHAPES = {
    # Llama-3.2-1B: 16 layers, d 2048, 32/8 heads x 64, ffn 8192, vocabulary 128256, tied embeddings
    "llama-3.2-1b": dict(n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192,
                         vocab_size=128256, context_length=131072, theta=500000.0, tied=True),
    # Llama-3-8B: 32 layers, d 4096, 32/8 heads x 128, ffn 14336, vocabulary 128256, separate output head
    "llama-3-8b": dict(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                       vocab_size=128256, context_length=8192, theta=500000.0, tied=False),
}
ONE_RUN = """
import json, resource, sys, time
import numpy as np
import engine
from engine.sampling import SamplingParams

path, copies, n_prompt, n_decode, context = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
t0 = time.perf_counter()
llm = engine.load(path, context=context, f32_copies=copies)
load_s = time.perf_counter() - t0
prompt = np.random.default_rng(0).integers(0, llm.tokenizer.vocab_size, n_prompt).tolist()
ids = list(llm.generate_ids(prompt, max_tokens=n_decode, sampling=SamplingParams(temperature=0.0), stop_ids=[]))
s = llm.last_stats
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"f32_copies": llm.memory.f32_copies, "plan_gib": llm.memory.total / 2**30, "peak_rss_gib": peak / 2**30,
                  "load_s": load_s, "prefill_tok_s": s.prompt_tokens_per_second,
                  "decode_tok_s": s.generation_tokens_per_second, "generated": len(ids)}))
"""


def write_shape(name: str) -> Path:
    from engine.config import ModelConfig, RopeConfig
    from engine.convert.synthetic import write_synthetic_gguf
    from engine.default_model import default_model_path

    s = SHAPES[name]
    path = Path(f"/tmp/{name}-shape-q4_k.gguf")
    if not path.exists():
        config = ModelConfig(n_layers=s["n_layers"], d_model=s["d_model"], n_heads=s["n_heads"],
                             n_kv_heads=s["n_kv_heads"], head_dim=s["head_dim"], ffn_dim=s["ffn_dim"],
                             vocab_size=s["vocab_size"], norm_eps=1e-5, context_length=s["context_length"],
                             rope=RopeConfig(theta=s["theta"], dim=s["head_dim"], original_context=s["context_length"]),
                             tied_embeddings=s["tied"], name=f"{name} shapes (random weights)")
        print(write_synthetic_gguf(path, config, tokenizer_source=default_model_path()).summary(), flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--copies", default="auto,on,off")
    args = parser.parse_args()
    if args.shape:
        path = write_shape(args.shape)
    else:
        from engine.default_model import default_model_path

        path = Path(args.model) if args.model else default_model_path()
    repo = Path(__file__).resolve().parents[1]
    for mode in args.copies.split(","):
        copies = {"auto": None, "on": True, "off": False}[mode]
        result = subprocess.run([sys.executable, "-c", ONE_RUN, str(path), json.dumps(copies), str(args.prompt),
                                 str(args.decode), str(args.context)], capture_output=True, text=True, cwd=repo)
        line = result.stdout.strip().splitlines()[-1] if result.returncode == 0 else result.stderr.strip()[-300:]
        print(f"{path.name} copies={mode}: {line}", flush=True)


if __name__ == "__main__":
    main()

"""Peak RSS and speed of the CPU backend, float32 copies vs weights as stored, one fresh process per run.

    python tools/cpu_memory_bench.py [MODEL.gguf | --shape llama3.2-1b] [--prompt 512] [--decode 8]
                                     [--copies auto,on,off] [--context 1024]

--shape writes a GGUF of random weights of that preset's shapes (engine/models/presets.py; Q4_K matrices, Q6_K
embedding and head) into /tmp with the engine's own writer (engine/convert/synthetic.py) first.
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

from engine.models.presets import PRESETS  # noqa: E402

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
    """The GGUF of `engine bench --shape NAME --save-gguf` (random Q4_K/Q6_K weights), written once into /tmp."""
    from engine.bench import shape_model
    from engine.convert.synthetic import write_synthetic_gguf
    from engine.default_model import default_model_path

    path = Path(f"/tmp/{name}-shape-q4_k.gguf")
    if not path.exists():
        loaded = shape_model(name)
        print(write_synthetic_gguf(path, loaded.config, default_model_path(), weights=loaded.weights).summary(),
              flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--shape", choices=sorted(PRESETS), default=None)
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

"""Size, perplexity and KL divergence vs F32 of each file type ``engine quantize`` writes, on one model.

    python tools/quant_quality.py --source f32.gguf --text held_out.txt --out-dir /tmp/q \\
        [--types f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_k_s,q4_0,q4_1] [--tokens 2048] [--window 1024]

``--source`` should be an F32 GGUF (e.g. ``engine quantize MODEL.gguf f32.gguf f32``): every file type
is written from it, and it is the reference. The first --tokens tokens of the text are cut into
windows of --window tokens (each prefilled from an empty cache, BOS first when the model adds one);
per file type: file size, bits per weight (tensor bytes * 8 / weights), perplexity exp(mean NLL) of
every next token, and the mean over positions of KL(P_f32 || P_type) of the next-token distributions.
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from engine.convert import quantize_gguf  # noqa: E402

DEFAULT_TYPES = "f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_k_s,q4_0,q4_1"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(n, vocab) -> float64 log-probabilities."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def token_windows(llm, text: str, n_tokens: int, window: int) -> list[list[int]]:
    ids = llm.tokenize(text, add_bos=False)
    if len(ids) < n_tokens:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --tokens {n_tokens}")
    bos = [llm.tokenizer.bos_id] if llm.tokenizer.add_bos else []
    return [bos + ids[start:start + window] for start in range(0, n_tokens, window)]


def evaluate(path: Path, windows: list[list[int]], reference: list[np.ndarray] | None):
    """(perplexity, mean KL vs reference or None, per-window log-probabilities)."""
    llm = engine.load(path)
    nll, kl, logprobs = [], [], []
    for i, ids in enumerate(windows):
        lp = log_softmax(llm.logits(ids)[:-1])  # position t predicts ids[t+1]
        nll.append(-lp[np.arange(len(ids) - 1), ids[1:]])
        if reference is not None:
            ref = reference[i]
            kl.append((np.exp(ref) * (ref - lp)).sum(axis=1))
        logprobs.append(lp)
    ppl = float(np.exp(np.concatenate(nll).mean()))
    return ppl, (float(np.concatenate(kl).mean()) if kl else None), logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="F32 GGUF: the reference, quantized to each type")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=1024)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    windows = token_windows(engine.load(args.source), args.text.read_text(), args.tokens, args.window)
    ppl, _, reference = evaluate(args.source, windows, None)
    rows = [("f32 (source)", args.source.stat().st_size, 32.0, ppl, 0.0, "")]
    for name in args.types.split(","):
        out = args.out_dir / f"{args.source.stem}-{name}.gguf"
        stats = quantize_gguf(args.source, out, name, force=True, progress=False)
        ppl, kl, _ = evaluate(out, windows, reference)
        types = ", ".join(f"{count} {t}" for t, count in stats.type_counts.items())
        rows.append((name, out.stat().st_size, stats.bits_per_weight, ppl, kl, types))
        print(f"{name}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"{sum(len(w) - 1 for w in windows)} predicted tokens of {args.text.name}, windows of {args.window}\n")
    print("| type | file MB | bits/weight | perplexity | KL vs F32 (nats) | tensors |")
    print("|---|---:|---:|---:|---:|---|")
    for name, size, bpw, ppl, kl, types in rows:
        print(f"| {name} | {size / 1e6:.1f} | {bpw:.2f} | {ppl:.3f} | {kl:.4f} | {types} |")


if __name__ == "__main__":
    main()

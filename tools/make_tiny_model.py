"""Tiny random Llama models for fast tests: the same weights as GGUF (many tensor types) and HF safetensors.

    python tools/make_tiny_model.py OUT_DIR [--variant gqa|mha|tied|kquant] [--types all|f32,q8_0,...]
                                    [--hf-dtype f32|bf16] [--hf-shards N] [--no-hf] [--seed S]

or, from Python (tests put tools/ on sys.path):

    from make_tiny_model import TinySpec, make_tiny_model
    paths = make_tiny_model(tmp_dir, TinySpec(tied=True), gguf_types=("f32", "q4_k"))
    # {"f32": .../tiny-f32.gguf, "q4_k": .../tiny-q4_k.gguf, "hf": .../hf}

What is written
- ``tiny-<type>.gguf`` for each requested type, laid out as llama.cpp's convert_hf_to_gguf.py writes a
  llama model: tensor names token_embd / blk.N.attn_{q,k,v,output} / blk.N.ffn_{gate,up,down} /
  blk.N.{attn,ffn}_norm / output_norm / output (absent when tied); Q and K rows permuted for
  llama.cpp's adjacent-pair RoPE (``permute_for_gguf``); llama.* hyperparameters; the gpt2 BPE
  tokenizer (tokens, token types, merges, special ids, ChatML template).
- ``hf/``: config.json (LlamaForCausalLM), model.safetensors (F32 or BF16; optionally sharded with
  model.safetensors.index.json), tokenizer.json, tokenizer_config.json, all in HF's rotate-half layout.

Tensor types. 1-D tensors (norms) are always F32, as llama.cpp keeps them. A 2-D weight gets the
requested type, except that a K-quant (Q4_K, Q6_K: 256-wide super-blocks) falls back to Q8_0 for a
weight whose row length (in-features) is not a multiple of 256. With the default spec (d_model=64)
that means every weight of ``tiny-q4_k.gguf`` is Q8_0; use the ``kquant`` variant (d_model=256,
ffn_dim=512) for files that are K-quant throughout. ``mixed`` gives every weight family its own
type (Q8_0, Q4_0, Q4_1, F16, BF16, Q4_K, Q6_K in one file) to exercise per-tensor dispatch.

Weights: N(0, 1/in_features) for every projection and the output head (activations and logits stay
O(1)), N(0, 1/d_model) for the embedding, the residual-branch outputs (o_proj, down_proj) further
scaled by 1/sqrt(2 n_layers), norms 1 + N(0, 0.1^2). With ``hf_dtype="bf16"`` every weight is first
rounded to bfloat16, so every file (F32 GGUF included) holds exactly the same numbers.

Tokenizer: byte-level BPE trained deterministically with `tokenizers` on TRAINING_TEXT (built in):
ids 0..2 are <|endoftext|> (unk), <|im_start|> (bos), <|im_end|> (eos, pad) as in SmolLM2, then the
256 byte symbols, then merges up to ``vocab_size``. The pre-tokenizer is GPT-2's regex, hence
``tokenizer.ggml.pre = "gpt2"``; no BOS is added to encoded text.

Q4_K and Q6_K tensors are encoded by the engine's own encoders (engine/convert/kquants.py, byte-equal
to llama.cpp's reference quantizers; gguf-py has dequantizers only), every other type by gguf-py.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.config import ModelConfig, RopeConfig
from engine.convert.quantize import encode_rows
from engine.convert.tensors import map_in_order, thread_count
from engine.models.family import family, gguf_tensor_name
from engine.weights.quant import GGMLType

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TRAINING_TEXT = """\
The lighthouse keeper wrote in his log every evening: wind from the north-west, three ships passed,
the lamp was trimmed at seven. Nobody read the log, but he kept it anyway, because keeping it was the job.
In the spring of 1887 a storm broke the lower window; the repair cost 14 shillings and 6 pence.
"Where are you going?" she asked. "To the market, then the station, then home again," he replied.
It was the best of times, it was the worst of times; it was the age of wisdom, it was the age of foolishness.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14159 2.71828 -17 +5 1,000,000 and 99%.
def fibonacci(n: int) -> list[int]:
    values = [0, 1]
    while len(values) < n:
        values.append(values[-1] + values[-2])
    return values[:n]
for (int i = 0; i < count; ++i) { total += weights[i] * inputs[i]; }
SELECT name, price FROM products WHERE price > 10 ORDER BY name;
Ünïcödé text: café, naïve, façade, São Paulo, Zürich, Ελληνικά, русский язык, 日本語のテキスト, 中文字符, 한국어.
Emoji and symbols: 🙂 🚀 ✓ → ≤ ≥ ± € £ ¥ © ™ … — “quoted” ‘single’.
Whitespace:   three spaces,\ttabs\t\tand
newlines

and trailing spaces   
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
A model that reads long documents must remember what came before: the name of the ship, the date of the storm,
the price of the window, and the words the keeper wrote on the last page of his log.
"""


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny Llama model (head_dim = d_model / n_heads; RoPE over the whole head)."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 96
    vocab_size: int = 384
    context_length: int = 256
    rope_theta: float = 10000.0
    tied: bool = False
    norm_eps: float = 1e-5
    seed: int = 0
    # llama3-style per-frequency divisors, written to GGUF as the `rope_freqs` tensor (head_dim/2 values)
    rope_freq_factors: tuple[float, ...] | None = None
    family: str = "llama"  # or "qwen2": Q/K/V biases, Qwen2ForCausalLM, GGUF architecture qwen2 (Q/K rows unpermuted)
    # the HF class of config.json (default: the family's first, LlamaForCausalLM / Qwen2ForCausalLM), e.g.
    # "MistralForCausalLM" (model_type mistral) for a llama-family model
    hf_architecture: str | None = None
    sliding_window: int | None = None  # Mistral's config.json sliding_window (GGUF has no key for it)
    # llama3 RoPE scaling (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings): HF
    # config.json's rope_scaling, and in GGUF the rope_freqs tensor computed from it as llama.cpp's converter does
    llama3_rope: tuple[float, float, float, int] | None = None

    def __post_init__(self) -> None:
        for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_dim", "context_length"):
            if getattr(self, key) <= 0:
                raise ValueError(f"TinySpec.{key} must be positive, got {getattr(self, key)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"TinySpec: d_model {self.d_model} must split into {self.n_heads} heads of even size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"TinySpec: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(f"TinySpec: rope_freq_factors needs {self.head_dim // 2} values")
        if self.rope_freq_factors is not None and self.llama3_rope is not None:
            raise ValueError("TinySpec: give rope_freq_factors or llama3_rope, not both")
        if self.hf_architecture is not None and self.hf_architecture not in family(self.family).hf_architectures:
            raise ValueError(f"TinySpec: {self.hf_architecture} is not a {self.family} architecture")
        if self.vocab_size <= 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"TinySpec: vocab_size {self.vocab_size} leaves no room for merges (> 259 needed)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def gguf_rope_freqs(self) -> tuple[float, ...] | None:
        """The GGUF rope_freqs tensor: rope_freq_factors, or llama3_rope's divisors computed as llama.cpp's
        convert_hf_to_gguf.py does (1 for short wavelengths, factor for long ones, smooth in between)."""
        if self.llama3_rope is None:
            return self.rope_freq_factors
        factor, low, high, original = self.llama3_rope
        freqs = 1.0 / self.rope_theta ** (np.arange(0, self.head_dim, 2) / self.head_dim)
        divisors = []
        for wavelength in 2 * np.pi / freqs:
            if wavelength < original / high:
                divisors.append(1.0)
            elif wavelength > original / low:
                divisors.append(factor)
            else:
                smooth = (original / wavelength - low) / (high - low)
                divisors.append(1.0 / ((1 - smooth) / factor + smooth))
        return tuple(divisors)

    def config(self) -> ModelConfig:
        return ModelConfig(n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
                           n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, ffn_dim=self.ffn_dim,
                           vocab_size=self.vocab_size, norm_eps=self.norm_eps, context_length=self.context_length,
                           rope=RopeConfig(theta=self.rope_theta, dim=self.head_dim), tied_embeddings=self.tied,
                           architecture=self.family)


VARIANTS = {
    "gqa": TinySpec(),
    "mha": TinySpec(n_kv_heads=4),
    "tied": TinySpec(tied=True),
    "kquant": TinySpec(d_model=256, ffn_dim=512),
    "d64": TinySpec(d_model=256, ffn_dim=256),  # head_dim 64: the CUDA backend's fused attention kernels
    "qwen2": TinySpec(d_model=256, ffn_dim=256, family="qwen2", rope_theta=1e6, tied=True),
    "mistral": TinySpec(d_model=128, ffn_dim=192, hf_architecture="MistralForCausalLM", sliding_window=128,
                        rope_theta=1e6),
    "llama3": TinySpec(d_model=128, ffn_dim=192, rope_theta=500000.0, llama3_rope=(8.0, 1.0, 4.0, 64)),
}

# type name -> (tensor type of 2-D weights, general.file_type)
GGUF_TYPES = {
    "f32": (QType.F32, LlamaFileType.ALL_F32),
    "f16": (QType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (QType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_k": (QType.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q6_k": (QType.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "mixed": (None, LlamaFileType.MOSTLY_Q4_K_M),
}
# "mixed": tensor type by GGUF short name (blk.N.<short>.weight, <short>.weight)
MIXED_TYPES = {
    "token_embd": QType.Q8_0,
    "attn_q": QType.Q4_K,
    "attn_k": QType.Q4_0,
    "attn_v": QType.Q6_K,
    "attn_output": QType.Q4_1,
    "ffn_gate": QType.F16,
    "ffn_up": QType.BF16,
    "ffn_down": QType.Q4_K,
    "output": QType.Q6_K,
}


# ---------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE with GPT-2's pre-tokenizer, trained on TRAINING_TEXT (deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the built-in training text yields only {tokenizer.get_vocab_size()} tokens, "
            f"TinySpec.vocab_size asks for {vocab_size}"
        )
    return tokenizer


def tokenizer_tables(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, GGUF token types, merges as "a b") of a trained byte-level BPE."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    token_types = [int(gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL) for t in tokens]
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # newer tokenizers store pairs
    return tokens, token_types, merges


# ---------------------------------------------------------------------------------------------- weights

def make_weights(spec: TinySpec, round_to_bf16: bool = False) -> dict[str, np.ndarray]:
    """HF-named float32 weights, (out, in) row-major, rotate-half RoPE layout."""
    rng = np.random.default_rng(spec.seed)
    d, f, hd = spec.d_model, spec.ffn_dim, spec.head_dim
    residual_scale = 1.0 / np.sqrt(2 * spec.n_layers)

    def linear(n_out: int, n_in: int, scale: float = 1.0) -> np.ndarray:
        return rng.normal(0.0, scale / np.sqrt(n_in), size=(n_out, n_in))

    def norm() -> np.ndarray:
        return 1.0 + 0.1 * rng.normal(size=d)

    weights = {"model.embed_tokens.weight": rng.normal(0.0, 1.0 / np.sqrt(d), size=(spec.vocab_size, d))}
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = linear(spec.n_heads * hd, d)
        weights[p + "self_attn.k_proj.weight"] = linear(spec.n_kv_heads * hd, d)
        weights[p + "self_attn.v_proj.weight"] = linear(spec.n_kv_heads * hd, d)
        if spec.family == "qwen2":  # Q/K/V biases, large enough to matter (Qwen2's are O(1))
            weights[p + "self_attn.q_proj.bias"] = rng.normal(0.0, 0.5, size=spec.n_heads * hd)
            weights[p + "self_attn.k_proj.bias"] = rng.normal(0.0, 0.5, size=spec.n_kv_heads * hd)
            weights[p + "self_attn.v_proj.bias"] = rng.normal(0.0, 0.5, size=spec.n_kv_heads * hd)
        weights[p + "self_attn.o_proj.weight"] = linear(d, spec.n_heads * hd, residual_scale)
        weights[p + "mlp.gate_proj.weight"] = linear(f, d)
        weights[p + "mlp.up_proj.weight"] = linear(f, d)
        weights[p + "mlp.down_proj.weight"] = linear(d, f, residual_scale)
        weights[p + "input_layernorm.weight"] = norm()
        weights[p + "post_attention_layernorm.weight"] = norm()
    weights["model.norm.weight"] = norm()
    if not spec.tied:
        weights["lm_head.weight"] = linear(spec.vocab_size, d)
    weights = {name: w.astype(np.float32) for name, w in weights.items()}
    if round_to_bf16:
        weights = {name: bf16_bits_to_f32(f32_to_bf16_bits(w)) for name, w in weights.items()}
    return weights


def f32_to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """Round to nearest even bfloat16, as ggml and torch do; returns the uint16 bit patterns."""
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), QType.BF16).view(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows (i, i+hd/2) -> adjacent rows (2i, 2i+1).

    w: (n_head * head_dim, in). Called with n_heads for Q and n_kv_heads for K.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_named_weights(spec: TinySpec, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF names -> GGUF names (the engine's tensor table), Q/K permuted where llama.cpp permutes them, in
    llama.cpp's file order."""
    fam = family(spec.family)
    by_name = {fam.engine_name(name): w for name, w in weights.items()}
    out = {}
    for name in fam.tensor_shapes(spec.config(), with_output=not spec.tied):
        w = by_name[name]
        if fam.gguf_qk_permuted and name.endswith(".attn_q"):
            w = permute_for_gguf(w, spec.n_heads)
        elif fam.gguf_qk_permuted and name.endswith(".attn_k"):
            w = permute_for_gguf(w, spec.n_kv_heads)
        out[gguf_tensor_name(name)] = w
    return out


def tensor_type_for(gguf_name: str, n_cols: int, requested: QType | None) -> QType:
    """Type of one GGUF tensor: 1-D -> F32; K-quants need 256 | n_cols, else Q8_0 (llama.cpp-style fallback)."""
    if requested is None:
        requested = MIXED_TYPES[gguf_name.split(".")[-2]]
    block_size = gguf.GGML_QUANT_SIZES[requested][0]
    if n_cols % block_size == 0:
        return requested
    if n_cols % 32 == 0:
        return QType.Q8_0
    raise ValueError(f"{gguf_name}: row length {n_cols} is not a multiple of 32, cannot store it as {requested.name}")


def encode_tensor(w: np.ndarray, qtype: QType) -> np.ndarray:
    """Bytes (or f32/f16 array) of one tensor in a GGUF type: K-quants by the engine's encoders (gguf-py has none;
    slabs of rows on every available CPU, as engine quantize does), the other types by gguf-py's quantizers (an
    independent reference for the engine's)."""
    if qtype in (QType.Q4_K, QType.Q6_K):
        step = max(1, (1 << 20) // w.shape[1])  # rows of ~1M values
        slabs = map_in_order(lambda start: encode_rows(w[start:start + step], GGMLType(int(qtype))),
                             range(0, w.shape[0], step), thread_count(None))
        return np.concatenate(list(slabs))
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


# ---------------------------------------------------------------------------------------------- writers

def write_gguf(path: Path, spec: TinySpec, gguf_weights: dict[str, np.ndarray], tokenizer: Tokenizer,
               type_name: str) -> None:
    weight_type, file_type = GGUF_TYPES[type_name]
    writer = gguf.GGUFWriter(str(path), spec.family)
    writer.add_name(f"tiny-{spec.family}-{type_name}")
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.d_model)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(spec.ffn_dim)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_file_type(file_type)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, token_types, merges = tokenizer_tables(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    for name, w in gguf_weights.items():
        if w.ndim == 1 or weight_type == QType.F32:
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
            continue
        qtype = tensor_type_for(name, w.shape[1], weight_type)
        data = encode_tensor(w, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    if spec.gguf_rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(spec.gguf_rope_freqs, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> int:
    """One safetensors file (F32, or BF16 stored from uint16 bit patterns); returns the data size."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, w in tensors.items():
        data = f32_to_bf16_bits(w) if dtype == "bf16" else np.ascontiguousarray(w, dtype="<f4")
        header[name] = {"dtype": "BF16" if dtype == "bf16" else "F32", "shape": list(w.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        blobs.append(data.tobytes())
        offset += data.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for blob in blobs:
            f.write(blob)
    return offset


def write_hf(hf_dir: Path, spec: TinySpec, weights: dict[str, np.ndarray], tokenizer: Tokenizer,
             dtype: str, shards: int) -> None:
    hf_dir.mkdir(parents=True, exist_ok=True)
    fam = family(spec.family)
    architecture = spec.hf_architecture or fam.hf_architectures[0]
    config = {
        "architectures": [architecture],
        "model_type": fam.hf_model_types[fam.hf_architectures.index(architecture)],
        "hidden_size": spec.d_model,
        "intermediate_size": spec.ffn_dim,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.context_length,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None if spec.llama3_rope is None else dict(
            zip(("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                spec.llama3_rope), rope_type="llama3"),
        "tie_word_embeddings": spec.tied,
        "hidden_act": "silu",
        "attention_bias": spec.family == "qwen2",
        **({"use_sliding_window": False} if spec.family == "qwen2" else {}),
        **({} if spec.sliding_window is None else {"sliding_window": spec.sliding_window}),
        "mlp_bias": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float32",
        "use_cache": True,
    }
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "unk_token": SPECIAL_TOKENS[UNK_ID],
        "pad_token": SPECIAL_TOKENS[EOS_ID],
        "model_max_length": spec.context_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    names = list(weights)
    if shards == 1:
        write_safetensors(hf_dir / "model.safetensors", weights, dtype)
        return
    weight_map, total = {}, 0
    for k, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file_name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        total += write_safetensors(hf_dir / file_name, {names[i]: weights[names[i]] for i in part}, dtype)
        weight_map.update({names[i]: file_name for i in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_tiny_model(out_dir, spec: TinySpec = TinySpec(), gguf_types=("f32",), hf: bool = True,
                    hf_dtype: str = "f32", hf_shards: int = 1) -> dict[str, Path]:
    """Write tiny-<type>.gguf per type (see GGUF_TYPES) and, with hf=True, out_dir/hf/; return their paths."""
    unknown = [t for t in gguf_types if t not in GGUF_TYPES]
    if unknown:
        raise ValueError(f"unknown GGUF type(s) {unknown}; choose from {', '.join(GGUF_TYPES)}")
    if hf_dtype not in ("f32", "bf16"):
        raise ValueError(f"hf_dtype must be 'f32' or 'bf16', got {hf_dtype!r}")
    weights = make_weights(spec, round_to_bf16=hf_dtype == "bf16")
    if not 1 <= hf_shards <= len(weights):
        raise ValueError(f"hf_shards must be between 1 and the number of tensors ({len(weights)}), got {hf_shards}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(spec.vocab_size)
    gguf_weights = gguf_named_weights(spec, weights)
    paths: dict[str, Path] = {}
    for type_name in gguf_types:
        paths[type_name] = out_dir / f"tiny-{type_name}.gguf"
        write_gguf(paths[type_name], spec, gguf_weights, tokenizer, type_name)
    if hf:
        paths["hf"] = out_dir / "hf"
        write_hf(paths["hf"], spec, weights, tokenizer, hf_dtype, hf_shards)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random Llama model as GGUF files and HF safetensors.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="gqa")
    parser.add_argument("--types", default="all", help=f"comma-separated from {','.join(GGUF_TYPES)}, or 'all'")
    parser.add_argument("--hf-dtype", choices=("f32", "bf16"), default="f32")
    parser.add_argument("--hf-shards", type=int, default=1)
    parser.add_argument("--no-hf", action="store_true", help="write only the GGUF files")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    spec = VARIANTS[args.variant]
    if args.seed is not None:
        spec = replace(spec, seed=args.seed)
    types = tuple(GGUF_TYPES) if args.types == "all" else tuple(t.strip() for t in args.types.split(","))
    started = time.perf_counter()
    paths = make_tiny_model(args.out_dir, spec, types, hf=not args.no_hf, hf_dtype=args.hf_dtype,
                            hf_shards=args.hf_shards)
    print(f"spec: {asdict(spec)}")
    for name, path in paths.items():
        print(f"{name:6s} {path}")
    print(f"done in {time.perf_counter() - started:.2f}s")


if __name__ == "__main__":
    main()

"""Layer split (llama.cpp's ``--split-mode layer``): which device runs which layers, and what each one holds.

A share is one device's contiguous range of layers; the embedding lives on the first share, the output head
(final norm + output matrix; token_embd again when tied) on the last. Ratios follow llama.cpp's
``--tensor-split``: one proportion per device (``1,1`` halves, ``3,1`` three quarters on device 0), the
output head counted as one more layer (so ``1,1`` on 30 layers gives 16 + 14 and the head), a device of
ratio 0 holds nothing. Without ratios, each device's free memory is its ratio (llama.cpp's default), or equal
shares where free memory is unknown (no GPU on this machine: the plan of ``engine info``).

``share_plans`` is each device's memory plan (engine/memory.py's rows, for the share's layers alone): the
weights of its layers (+ embedding / head), its layers' part of the KV cache, its own scratch and activations
(each stage runs a whole prefill batch through its layers), and the logits on the last one.
``--split-mode row`` (tensor parallelism) is not implemented and refused (``resolve_split``).
"""
from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from typing import Sequence

from . import memory
from .config import ModelConfig
from .errors import ConfigError

SPLIT_MODES = ("none", "layer", "row")


@dataclass(frozen=True)
class Share:
    """One device's part of a layer split."""

    device: int  # 0 .. N-1 (cupy.cuda.Device index on CUDA; a CPU rank of the simulation on the CPU)
    layers: range  # the model's layers it runs, contiguous
    first: bool  # holds the token embedding
    last: bool  # holds the output head

    def describe(self) -> str:
        """'layers 0-15 + embedding'."""
        text = f"layers {self.layers.start}-{self.layers.stop - 1}"
        return text + (" + embedding" if self.first else "") + (" + output head" if self.last else "")


def parse_tensor_split(text: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """--tensor-split '3,1' (or llama.cpp's '3/1') -> (3.0, 1.0); a sequence of numbers as it is; None as None."""
    if text is None:
        return None
    if not isinstance(text, str):
        return tuple(float(r) for r in text)
    try:
        return tuple(float(part) for part in text.replace("/", ",").split(","))
    except ValueError:
        raise ConfigError(f"--tensor-split takes proportions separated by commas (e.g. 3,1), got {text!r}") from None


def split_layers(n_layers: int, ratios: Sequence[float]) -> list[Share]:
    """Layers -> contiguous shares of the devices with a share, in device order (llama.cpp's rule: layer i
    goes to the first device whose cumulative share exceeds i / (n_layers + 1)). Devices that get no layer
    hold nothing and are left out."""
    ratios = check_ratios(ratios, n_layers)
    total, bounds, running = sum(ratios), [], 0.0
    for r in ratios:
        running += r
        bounds.append(running / total)  # cumulative share, the last one 1.0
    owner = [bisect.bisect_right(bounds, i / (n_layers + 1)) for i in range(n_layers)]  # device of each layer
    devices = sorted(set(owner))
    shares = []
    for k, device in enumerate(devices):
        first = owner.index(device)
        shares.append(Share(device, range(first, first + owner.count(device)), k == 0, k == len(devices) - 1))
    return shares


def check_ratios(ratios: Sequence[float], n_layers: int) -> list[float]:
    """Refuse ratios no split can follow: negative, all zero, more devices with a share than layers."""
    ratios = [float(r) for r in ratios]
    if not ratios:
        raise ConfigError("--tensor-split needs at least one proportion")
    if any(r < 0 or r != r for r in ratios):
        raise ConfigError(f"--tensor-split proportions must be >= 0, got {','.join(f'{r:g}' for r in ratios)}")
    if sum(ratios) == 0:
        raise ConfigError("--tensor-split proportions are all 0: at least one device needs a share")
    sharing = sum(r > 0 for r in ratios)
    if sharing > n_layers:
        raise ConfigError(f"--tensor-split gives {sharing} devices a share but the model has only {n_layers} "
                          f"layers: at most {n_layers} devices can each run one")
    return ratios


def resolve_split(split_mode: str, tensor_split: str | Sequence[float] | None, gpus: int | None,
                  n_layers: int, free: Sequence[int | None] | None = None) -> list[Share] | None:
    """--split-mode, --tensor-split and --gpus -> the shares, or None for no split.

    free: each visible device's free bytes (None entries: unknown), for ratios by free memory and to check
    the device count; None where devices are simulated (CPU ranks) or unknown (no GPU here).
    """
    if split_mode not in SPLIT_MODES:
        raise ConfigError(f"unknown split mode {split_mode!r} (choose from {', '.join(SPLIT_MODES)})")
    if split_mode == "row":
        raise ConfigError("--split-mode row (tensor parallelism: each matrix split across the GPUs) is not "
                          "implemented; use --split-mode layer (each GPU runs a range of layers)")
    ratios = parse_tensor_split(tensor_split)
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    if split_mode == "none":
        if ratios is not None or gpus is not None:
            raise ConfigError("--tensor-split and --gpus apply with --split-mode layer")
        return None
    if ratios is not None and gpus is not None and len(ratios) != gpus:
        raise ConfigError(f"--tensor-split gives {len(ratios)} proportions for --gpus {gpus}: give one per GPU")
    count = device_count(ratios, gpus, free)
    if count == 0:
        raise ConfigError("--split-mode layer needs --gpus N or --tensor-split (no GPU is visible to count)")
    if free and count > len(free):
        raise ConfigError(f"the split asks for {count} GPUs but {len(free)} {'is' if len(free) == 1 else 'are'} "
                          f"visible")
    if ratios is None:
        known = list(free or ())[:count]
        ratios = known if len(known) == count and all(f is not None for f in known) else [1.0] * count
    return split_layers(n_layers, ratios)


def device_count(ratios: Sequence[float] | None, gpus: int | None, free: Sequence[int | None] | None) -> int:
    """How many devices a split is over: one per --tensor-split proportion, else --gpus, else every visible GPU."""
    return len(ratios) if ratios is not None else gpus if gpus is not None else len(free or ())


def share_tensors(weights: dict, share: Share, tied: bool) -> dict:
    """The loader weights a share holds, by engine name: its layers', the embedding on the first, the final
    norm and output matrix on the last (with tied embeddings on a later share: token_embd, as its "output")."""
    held = {name: w for name, w in weights.items()
            if name.startswith("blk.") and int(name.split(".")[1]) in share.layers}
    if share.first:
        held["token_embd"] = weights["token_embd"]
    if share.last:
        held["output_norm"] = weights["output_norm"]
        if not (tied and share.first):  # tied on one share: the embedding is the head (Weights.from_named)
            held["output"] = weights["token_embd" if tied else "output"]
    return held


def share_weights(weights: dict, share: Share, tied: bool) -> dict:
    """share_tensors with the layers renumbered from 0: the weights of a model of len(share.layers) layers."""
    start = share.layers.start
    return {(f"blk.{int(name.split('.')[1]) - start}.{name.split('.', 2)[2]}" if name.startswith("blk.") else name): w
            for name, w in share_tensors(weights, share, tied).items()}


def share_plans(config: ModelConfig, weights: dict, shares: Sequence[Share], context: int, device: str,
                dtype: str, cache_types: tuple[str, str] | None = None, slots: int = 1,
                f32_copies: bool | None = None) -> list[memory.MemoryPlan]:
    """Each share's memory plan (plan_memory over the share's own weights and layers); logits on the last only,
    the CPU's runtime allowance on the first only (CPU ranks share one process)."""
    plans = []
    for share in shares:
        part = dataclasses.replace(config, n_layers=len(share.layers))
        held = share_weights(weights, share, config.tied_embeddings)
        plan = memory.plan_memory(part, held, context, device, dtype, f32_copies, None, slots, cache_types)
        plans.append(dataclasses.replace(plan, logits=plan.logits if share.last else 0,
                                         runtime=plan.runtime if share.first else 0))
    return plans


def require_shares(shares: Sequence[Share], plans: Sequence[memory.MemoryPlan], free: Sequence[int | None]) -> None:
    """Refuse a split whose share does not fit its GPU (free[device] bytes; None or missing: unknown, not checked),
    naming the GPU, its layers and the numbers (memory.require: ContextError with the largest context that share
    fits, DeviceError when none does)."""
    for share, plan in zip(shares, plans):
        available = free[share.device] if share.device < len(free) else None
        memory.require(plan, available, what=f"GPU {share.device}'s share ({share.describe()}) at a "
                                                       f"context of {plan.context} tokens")

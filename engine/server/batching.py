"""Batched decode steps: the busy slots' next tokens run as ONE forward of B rows instead of B forwards of one.

    batcher = DecodeBatcher(llm.model, turns, on_batch=metrics.decode_batch)
    session.generate_ids(prompt_ids, ..., decoders=batcher)    # its decode steps now go through the batcher

Why: on the CPU a decode step is bound by reading the weights, so B slots stepping one after another read them
B times per round of tokens; ``Llama.forward_batch`` reads them once for all B rows (products over (B, d),
store_kv and attention per sequence on its own cache). Only where the backend declares ``batched_decode``
(numpy); the CUDA backend's fused blocks and graphs serve one sequence, its slots decode turn by turn.

The scheme (combining in the slots' own worker threads; no scheduler thread):
- A generation's decoder (``BatchedDecoder``: HostDecoder's sampling and non-finite check on its own sampler,
  parameters, seed and history) joins the batcher once its prompt is prefilled and leaves when its decode loop
  ends (finished, stopped, closed after a disconnect, failed).
- A decode step posts (cache, token) and waits. When every decoder that has joined has posted a step, the
  thread whose post completed the set takes them all as one batch and runs it in ONE model turn (turns.py:
  FIFO, so batches alternate with the prefill batches of slots still reading their prompts, which never join
  a batch); each step gets its own row of logits and its slot samples from it in its own thread.
- A step whose cache is full gets a ContextError of its own; the other steps of the batch run. An error of the
  batched forward itself goes to every step of that batch.
A decoder between two steps only samples and hands its text to the event loop (it never waits for the network),
and one that is done leaves before anything else, so a batch waits only for slots that are about to post.
One decoder alone runs ``forward`` as a generation without the batcher does (Llama.forward_batch of one).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import numpy as np

from ..decoder import HostDecoder
from ..errors import ConfigError, ContextError
from ..sampling import SamplingParams
from .turns import ModelTurns


class _Step:
    """One decoder's posted step: its cache and token in; its (vocab,) logits or its error out."""

    def __init__(self, cache: Any, token: int):
        self.cache, self.token = cache, token
        self.taken = False  # in a batch (run by whichever thread took it)
        self.done = False
        self.logits: np.ndarray | None = None
        self.error: BaseException | None = None


class DecodeBatcher:
    def __init__(self, model: Any, turns: ModelTurns, on_batch: Callable[[int], None] = lambda size: None):
        """model: the Llama whose steps are batched; on_batch(size) after every batch run (the server's metric)."""
        self.model, self.turns, self.on_batch = model, turns, on_batch
        self._changed = threading.Condition()
        self._decoders = 0  # decoders joined and not yet left
        self._posted: list[_Step] = []  # steps posted and not yet taken into a batch

    def decoder(self, model: Any, cache: Any, sampling: SamplingParams, history: Sequence[int]) -> "BatchedDecoder":
        """The ``decoders.decoder`` of LLM.generate_on: a decode loop (joined now) whose steps are batched here."""
        if model is not self.model:
            raise ConfigError("a decode batcher batches the steps of the model it was made for")
        decoder = BatchedDecoder(self, cache, sampling, history)  # (a bad sampling setting is refused before joining)
        with self._changed:
            self._decoders += 1
        return decoder

    def leave(self) -> None:
        with self._changed:
            self._decoders -= 1
            self._changed.notify_all()  # the steps posted so far may be all there will be

    def logits(self, cache: Any, token: int) -> np.ndarray:
        """Feed token at cache.length (committed) in the next batch -> its (vocab,) logits."""
        step = _Step(cache, token)
        with self._changed:
            self._posted.append(step)
            self._changed.notify_all()
            while not step.taken and len(self._posted) < self._decoders:
                self._changed.wait()
            batch = None
            if not step.taken:  # every decoder has posted: this thread runs them all
                batch, self._posted = self._posted, []
                for posted in batch:
                    posted.taken = True
        if batch is not None:
            self._run(batch)
        with self._changed:
            while not step.done:
                self._changed.wait()
        if step.error is not None:
            raise step.error
        return step.logits

    def _run(self, batch: list[_Step]) -> None:
        """One model turn: the steps with room in their caches as one forward; every step done afterwards."""
        try:
            with self.turns.turn():
                ready = []
                for step in batch:
                    try:
                        step.cache.check_room(1)
                        ready.append(step)
                    except ContextError as e:
                        step.error = e
                try:
                    if ready:
                        logits = self.model.forward_batch([[step.token] for step in ready],
                                                          [step.cache for step in ready])  # (B, vocab)
                        for step, row in zip(ready, self.model.backend.to_numpy(logits)):
                            step.logits = row
                        self.on_batch(len(ready))
                except BaseException as e:  # handed to every step of the batch, raised in each one's thread
                    for step in ready:
                        step.error = e
        finally:
            with self._changed:
                for step in batch:
                    step.done = True
                self._changed.notify_all()


class BatchedDecoder(HostDecoder):
    """A HostDecoder (first, step, sampling, the non-finite check) whose steps run in its batcher's batches."""

    def __init__(self, batcher: DecodeBatcher, cache: Any, sampling: SamplingParams, history: Sequence[int]):
        super().__init__(batcher.model.backend, batcher.model, cache, sampling, history)
        self.batcher = batcher
        self.closed = False

    def start(self, token: int) -> int:
        """The prompt's last token runs as its prefill would, in the turn its generation already holds, not in a
        batch (whose turn that thread could not take again)."""
        return self._pick(HostDecoder.next_logits(self, token))

    def next_logits(self, token: int) -> np.ndarray:
        return self.batcher.logits(self.cache, token)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.batcher.leave()

"""The OpenAI-compatible ASGI app (starlette): one model, one session per slot, the slots taking turns.

    GET  /health                 200 {"status": "ok", "slots_idle": i, "slots_processing": p}; 503 while the model
                                 loads (in a background thread)
    GET  /v1/models              the served model
    POST /v1/completions         prompt -> text; "stream": true sends server-sent events
    POST /v1/chat/completions    messages -> the assistant's answer through the model's chat template
    POST /tokenize, /detokenize  {"content": text} -> {"tokens": [...]}, {"tokens": [...]} -> {"content": text}
    GET  /metrics                Prometheus counters (requests, tokens, prompt/generation seconds, cache hits),
                                 gauges (slots, slots processing, requests waiting) and the decode batch sizes

Slots (slots.py): the model is loaded with N KV caches (``engine serve --parallel N``, ``engine.load(slots=N)``)
and the server keeps one session on each. A request takes a free slot (the one holding the longest shared
prefix, else the least recently used) or waits in a FIFO queue; on its slot, a prompt that shares a prefix
with the slot's sequence (the next turn of a chat, another question about the same document) prefills only the
rest, and ``usage.prompt_tokens_details.cached_tokens`` says how much was reused. Each busy slot's generation
runs in a worker thread of its own, which never waits for the network; the model itself runs one step at a time
(turns.py: a decode token or a prefill batch per turn, in FIFO order), so all busy slots advance token by token.
Where the backend can (numpy), the decoding slots' steps run as one batched forward per turn (batching.py:
``create_app(batch_decode=True)``, ``engine serve --no-batch-decode`` turns it off), each slot sampling its own row.
A client that disconnects stops its generation at the next token and frees its slot. A stream with
"return_progress": true also gets llama.cpp-style ``prompt_progress`` chunks (total, cache, processed tokens)
while its prompt is prefilled. Every refused request gets an OpenAI-style error body and a 4xx status.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import pipeline
from ..errors import EngineError
from .batching import DecodeBatcher
from .metrics import Metrics
from .protocol import ApiError, Job, check_model, fit_to_context, parse_job, typed_field
from .slots import Slot, SlotPool
from .stops import StopMatcher
from .turns import ModelTurns

log = logging.getLogger("engine.server")


class ServerState:
    """The model (once loaded), its slots (one per KV cache it was loaded with), the model turns, the slots'
    worker threads and the counters."""

    def __init__(self, load_model: Callable[[], Any], model_name: str, batch_decode: bool = True):
        self.load_model = load_model
        self.model_name = model_name
        self.batch_decode = batch_decode  # batch the slots' decode steps where the backend can (batching.py)
        self.llm = None
        self.slots: SlotPool | None = None
        self.turns: ModelTurns | None = None
        self.batcher: DecodeBatcher | None = None  # None: the slots' decode steps take a turn each
        self.workers: ThreadPoolExecutor | None = None  # one thread per slot
        self.load_error: BaseException | None = None
        self.on_load_error: Callable[[], None] = lambda: None
        self.metrics = Metrics()
        self.created = int(time.time())

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="engine-load", daemon=True).start()

    def _load(self) -> None:
        try:
            t0 = time.perf_counter()
            llm = self.load_model()
            n_slots = len(llm.caches)
            self.slots = SlotPool([llm.session(slot=i) for i in range(n_slots)])
            self.turns = ModelTurns(_device_sync(llm))
            if self.batch_decode and llm.backend.batched_decode:
                self.batcher = DecodeBatcher(llm.model, self.turns, self.metrics.decode_batch)
            self.workers = ThreadPoolExecutor(n_slots, thread_name_prefix="engine-slot")
            self.llm = llm
            log.info("model %s loaded in %.1f s: %s (%s), context %d, %d slot(s), decode steps %s", self.model_name,
                     time.perf_counter() - t0, llm.device, llm.dtype, llm.context, n_slots,
                     "batched" if self.batcher else "one slot at a time")
        except BaseException as e:  # reported by /health, and the command stops the server
            self.load_error = e
            self.on_load_error()

    def require_model(self) -> None:
        if self.load_error is not None:
            raise ApiError(500, f"the model failed to load: {self.load_error}", kind="server_error")
        if self.llm is None:
            raise ApiError(503, "Loading model", code="model_loading", kind="unavailable_error")

    def gauges(self) -> dict[str, int]:
        """The slot gauges of /metrics (metrics.GAUGES)."""
        if self.slots is None:
            return {"slots": 0, "slots_processing": 0, "requests_waiting": 0}
        return {"slots": len(self.slots.slots), "slots_processing": self.slots.processing,
                "requests_waiting": self.slots.waiting}


def _device_sync(llm) -> Callable[[], None]:
    """What ends a model turn: waiting for every stage's device (a CUDA prefill's kernels run asynchronously;
    nothing to wait for on the CPU)."""
    return lambda: pipeline.synchronize(llm.stages)


class Generation:
    """One job on its slot's session, driven from a slot's worker thread: ``next_text()`` until None, then
    ``finish_reason`` and ``stats``. Stop strings are cut off; ``close()`` ends the generation wherever it is.
    Model work (the first token with the prompt's prefill, each next token, the close) runs in model turns."""

    def __init__(self, state: ServerState, slot: Slot, job: Job):
        self.state, self.session, self.turns = state, slot.session, state.turns
        self.tokens = slot.session.generate_ids(job.prompt_ids, job.max_tokens, job.sampling,
                                                stop_ids=[] if job.ignore_eos else None, progress=self._progress,
                                                decoders=state.batcher)
        self.on_progress: Callable[[int, int], None] | None = None  # (prefilled, to prefill), from the worker
        self.pieces = state.llm.text_stream(self._token_per_turn())
        self.matcher = StopMatcher(job.stop)
        self.finish_reason: str | None = None
        self.stats = None
        self.closed = False

    def _token_per_turn(self) -> Iterator[int]:
        """The tokens, each computed in a model turn; with a batcher, only the first (the prompt's prefill) takes
        a turn here: each decode step after it takes one in the batcher, together with the other slots' steps."""
        with self.turns.turn():
            token = next(self.tokens, None)
        while token is not None:
            yield token
            if self.state.batcher is not None:
                token = next(self.tokens, None)
            else:
                with self.turns.turn():
                    token = next(self.tokens, None)

    def next_text(self) -> str | None:
        """The next text to send (never empty), or None when the generation is over."""
        while self.finish_reason is None:
            piece = next(self.pieces, None)
            if piece is None:
                self.close()
                self.finish_reason = "stop" if self.stats.stop_reason == "eos" else "length"
                return self.matcher.flush() or None
            text, stopped = self.matcher.push(piece)
            if stopped:
                self.close()
                self.finish_reason = "stop"
                return text or None
            if text:
                return text
        return None

    def close(self) -> None:
        """End the generation (in the worker thread: it may wait for a model turn)."""
        if self.closed:
            return
        self.closed = True
        self.pieces.close()
        with self.turns.turn():
            self.tokens.close()  # the session's tokens follow its cache again
        self.stats = self.session.last_stats
        if self.stats is not None:
            self.state.metrics.generation(self.stats)

    def _progress(self, done: int, total: int) -> None:
        """After each prefill batch (inside a model turn): report, and let the other slots step."""
        if done < total or total > 4096:
            log.info("prompt: %d / %d tokens prefilled", done, total)
        if self.on_progress is not None:
            self.on_progress(done, total)
        self.turns.pass_turn()


# ----------------------------------------------------------------------------------------- responses
def usage(stats) -> dict[str, Any]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def _choice(job: Job, text: str | None, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
    if not job.chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if finish_reason is not None and text is None:
        return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
    delta = {"role": "assistant", "content": text or ""} if first else {"content": text}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclass
class Progress:
    """Prompt processing so far: `done` of the `total` tokens to prefill (the cached ones not counted)."""

    done: int
    total: int


async def _texts(state: ServerState, generation: Generation, progress: bool) -> AsyncIterator[str | Progress]:
    """The generation's texts (and, when asked, its prompt progress) as a slot's worker thread produces them:
    decoding never waits for the network. When the consumer stops (a client disconnected), the worker stops at
    the next token, closes the generation and is waited for: then the slot is consistent and may be reused."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    if progress:
        generation.on_progress = lambda done, total: loop.call_soon_threadsafe(queue.put_nowait, Progress(done, total))

    def work() -> None:
        try:
            try:
                while not stop.is_set() and (text := generation.next_text()) is not None:
                    loop.call_soon_threadsafe(queue.put_nowait, text)
            finally:
                generation.close()
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except BaseException as e:  # handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, e)

    worker = loop.run_in_executor(state.workers, work)
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with anyio.CancelScope(shield=True):
            await worker


async def _stream(state: ServerState, job: Job, head: dict[str, Any]) -> AsyncIterator[str]:
    chunk_object = "chat.completion.chunk" if job.chat else "text_completion"
    async with state.slots.take(job.prompt_ids) as slot:
        generation = Generation(state, slot, job)
        texts = _texts(state, generation, job.return_progress)
        try:
            if job.chat:
                yield _sse({**head, "object": chunk_object, "choices": [_choice(job, "", None, first=True)]})
            async for item in texts:
                if isinstance(item, Progress):
                    cached = len(job.prompt_ids) - item.total
                    yield _sse({**head, "object": chunk_object, "choices": [], "prompt_progress": {
                        "total": len(job.prompt_ids), "cache": cached, "processed": cached + item.done}})
                else:
                    yield _sse({**head, "object": chunk_object, "choices": [_choice(job, item, None)]})
            yield _sse({**head, "object": chunk_object, "choices": [_choice(job, None, generation.finish_reason)]})
            if job.include_usage:
                yield _sse({**head, "object": chunk_object, "choices": [], "usage": usage(generation.stats)})
        except EngineError as e:
            yield _sse(ApiError(400, str(e)).body())
        finally:
            await texts.aclose()  # the worker has stopped: the slot is consistent, the next request may take it
    yield "data: [DONE]\n\n"


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body iterator however the stream ends (a client that disconnects
    included), so the generation stops and the slot is freed now rather than when the iterator is collected."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


# ------------------------------------------------------------------------------------------ handlers
async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


def _prepare_prompt(llm, job: Job) -> None:
    """Tokenize the job's prompt (chat: through the template) and check it fits the context."""
    if job.chat:
        job.prompt_ids = llm.chat_ids(job.messages)
    elif isinstance(job.prompt, str):
        job.prompt_ids = llm.tokenize(job.prompt)
    else:
        vocab = llm.config.vocab_size
        if any(not 0 <= t < vocab for t in job.prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        job.prompt_ids = list(job.prompt)
    fit_to_context(job, llm.context)


async def _generate(request: Request, state: ServerState, chat: bool) -> Response:
    job = parse_job(await _json_body(request), chat, state.model_name)
    await run_in_threadpool(_prepare_prompt, state.llm, job)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": state.model_name}
    if job.stream:
        return _ClosingStreamingResponse(_stream(state, job, head), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    async with state.slots.take(job.prompt_ids) as slot:
        generation = Generation(state, slot, job)
        texts = _texts(state, generation, progress=False)
        try:
            text = "".join([piece async for piece in texts])
        finally:
            await texts.aclose()
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": generation.finish_reason}
    else:
        choice = _choice(job, text, generation.finish_reason)
    return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                         "usage": usage(generation.stats)})


async def completions(request: Request, state: ServerState) -> Response:
    return await _generate(request, state, chat=False)


async def chat_completions(request: Request, state: ServerState) -> Response:
    return await _generate(request, state, chat=True)


async def tokenize(request: Request, state: ServerState) -> Response:
    body = await _json_body(request)
    check_model(body if isinstance(body, dict) else {}, state.model_name)
    content = typed_field(body, "content", str, required=True)
    add_special = typed_field(body, "add_special", bool, default=True)
    ids = await run_in_threadpool(state.llm.tokenize, content, None if add_special else False)
    return JSONResponse({"tokens": ids})


async def detokenize(request: Request, state: ServerState) -> Response:
    body = await _json_body(request)
    tokens = typed_field(body, "tokens", list, required=True)
    vocab = state.llm.config.vocab_size
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens):
        raise ApiError(400, f"tokens must be integers in [0, {vocab})", "tokens")
    return JSONResponse({"content": state.llm.detokenize(tokens)})


async def health(request: Request, state: ServerState) -> Response:
    return JSONResponse({"status": "ok", "slots_idle": state.slots.idle, "slots_processing": state.slots.processing})


async def models(request: Request, state: ServerState) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "engine"}]})


async def metrics(request: Request, state: ServerState) -> Response:
    return PlainTextResponse(state.metrics.render(state.gauges()), media_type="text/plain; version=0.0.4")


def _endpoint(state: ServerState, handler, needs_model: bool = True):
    """The handler with errors as OpenAI-style bodies, counted in the metrics."""
    async def run(request: Request) -> Response:
        try:
            if needs_model:
                state.require_model()
            response = await handler(request, state)
        except ApiError as e:
            response = JSONResponse(e.body(), status_code=e.status)
        except EngineError as e:  # bad input found by the engine itself (a chat template refusing messages, ...)
            response = JSONResponse(ApiError(400, str(e)).body(), status_code=400)
        state.metrics.request(request.url.path, response.status_code)
        return response
    return run


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(ApiError(exc.status_code, message, kind=kind).body(), status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error answering %s %s", request.method, request.url.path)
    body = ApiError(500, f"internal server error ({type(exc).__name__})", kind="server_error").body()
    return JSONResponse(body, status_code=500)


def create_app(load_model: Callable[[], Any], model_name: str, batch_decode: bool = True) -> Starlette:
    """The app; load_model() runs in a background thread at startup (app.state.engine: the ServerState).
    batch_decode: run the decoding slots' steps as one batched forward where the backend can (batching.py)."""
    state = ServerState(load_model, model_name, batch_decode)
    routes = [
        Route("/health", _endpoint(state, health), methods=["GET"]),
        Route("/v1/models", _endpoint(state, models, needs_model=False), methods=["GET"]),
        Route("/metrics", _endpoint(state, metrics, needs_model=False), methods=["GET"]),
        Route("/v1/completions", _endpoint(state, completions), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(state, chat_completions), methods=["POST"]),
        Route("/tokenize", _endpoint(state, tokenize), methods=["POST"]),
        Route("/detokenize", _endpoint(state, detokenize), methods=["POST"]),
    ]

    @asynccontextmanager
    async def lifespan(app):
        state.start_loading()
        yield

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.engine = state
    return app

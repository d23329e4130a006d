"""OpenAI request bodies -> validated jobs, and the error body every bad request gets.

Fields read (others are ignored, as llama.cpp's server does): model (optional; must name the served model),
prompt (completions: a string or a list of token ids), messages (chat), max_tokens / max_completion_tokens,
temperature, top_p, seed, stop (a string or up to 16), stream, stream_options.include_usage, n (only 1), and
llama.cpp's top_k, min_p, repeat_penalty, repeat_last_n, ignore_eos (generate max_tokens, for benchmarks) and
return_progress (streams: prompt progress chunks). Omitted sampling fields take the engine's defaults.
A wrong type or value is an ApiError (HTTP 4xx), as is a prompt that does not fit the context with max_tokens:
nothing is truncated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import EngineError
from ..sampling import SamplingParams

MAX_STOPS = 16
SAMPLING_FIELDS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repeat_penalty": float,
                   "repeat_last_n": int, "seed": int}
UNSUPPORTED_WHEN_SET = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias")
CHAT_ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One generation request, validated; prompt_ids are filled in by tokenize()."""

    chat: bool
    prompt: str | list[int] | None = None  # completions
    messages: list[dict[str, str]] = field(default_factory=list)  # chat
    max_tokens: int | None = None
    sampling: SamplingParams = SamplingParams()
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    return_progress: bool = False
    prompt_ids: list[int] = field(default_factory=list)


def parse_job(body: Any, chat: bool, model_name: str) -> Job:
    """A /v1/completions (chat=False) or /v1/chat/completions body -> Job (ApiError when malformed)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_model(body, model_name)
    job = Job(chat=chat)
    if chat:
        job.messages = _messages(body.get("messages"))
    else:
        job.prompt = _prompt(body.get("prompt"))
    tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
    param = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    if tokens is not None:
        job.max_tokens = _typed(tokens, int, param)
        if job.max_tokens < 1:
            raise ApiError(400, f"{param} must be at least 1, got {job.max_tokens}", param)
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n = 1 is supported", "n")
    for name in UNSUPPORTED_WHEN_SET:
        if body.get(name) not in (None, False, 0, [], {}):
            raise ApiError(400, f"{name} is not supported by this server", name)
    job.sampling = _sampling(body)
    job.stop = _stops(body.get("stop"))
    job.stream = _typed(body.get("stream", False), bool, "stream")
    job.ignore_eos = _typed(body.get("ignore_eos", False), bool, "ignore_eos")
    job.return_progress = _typed(body.get("return_progress", False), bool, "return_progress")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object", "stream_options")
        job.include_usage = _typed(options.get("include_usage", False), bool, "stream_options.include_usage")
    return job


def fit_to_context(job: Job, context: int) -> None:
    """Refuse a prompt that, with max_tokens, does not fit the context; default max_tokens: the rest of it."""
    n = len(job.prompt_ids)
    if n == 0:
        raise ApiError(400, "the prompt is empty", "prompt" if not job.chat else "messages")
    room = context - n
    if job.max_tokens is None and room >= 1:
        job.max_tokens = room
    if job.max_tokens is None or job.max_tokens > room:
        asked = 1 if job.max_tokens is None else job.max_tokens
        raise ApiError(400, f"this model's context is {context} tokens, but {n + asked} were requested ({n} in "
                            f"the prompt, {asked} for the completion); shorten the prompt or max_tokens",
                       "messages" if job.chat else "prompt", "context_length_exceeded")


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                       "model_not_found")


def typed_field(body: Any, name: str, kind: type, default: Any = None, required: bool = False) -> Any:
    """body[name] checked to be of `kind` (bool is not an int here); ApiError otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"missing required field {name!r}", name)
        return default
    return _typed(body[name], kind, name)


def _typed(value: Any, kind: type, name: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"{name} must be {_kind_name(kind)}, got {type(value).__name__} {value!r}"[:300], name)
    return value


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "a boolean", str: "a string", list: "an array",
            dict: "an object"}.get(kind, kind.__name__)


def _prompt(prompt: Any) -> str | list[int]:
    if prompt is None:
        raise ApiError(400, "missing required field 'prompt'", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise ApiError(400, "prompt must be a string or an array of token ids (one prompt per request)", "prompt")


def _messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        raise ApiError(400, "missing required field 'messages'", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty array", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                           f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(message.get("content"), f"messages[{i}].content")})
    return out


def _content(content: Any, param: str) -> str:
    """A message's text: a string, or an array of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{param} must be a string or an array of text parts", param)


def _sampling(body: dict) -> SamplingParams:
    values = {name: _typed(body[name], kind, name) for name, kind in SAMPLING_FIELDS.items()
              if body.get(name) is not None}
    if values.get("seed") == -1:  # llama.cpp's server: -1 = a random seed
        del values["seed"]
    try:
        return SamplingParams(**values)
    except EngineError as e:
        raise ApiError(400, str(e)) from None


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop must be a non-empty string or an array of at most {MAX_STOPS} of them", "stop")
    return stops

"""Counters, gauges and the decode batch sizes' histogram for GET /metrics, in Prometheus' text format."""
from __future__ import annotations

import threading
from collections import Counter

COUNTERS = {  # name -> help
    "prompt_tokens_total": "Prompt tokens of finished generations.",
    "prompt_cached_tokens_total": "Prompt tokens reused from the session's KV cache (not prefilled).",
    "generated_tokens_total": "Tokens generated.",
    "prompt_seconds_total": "Seconds spent prefilling prompts.",
    "generation_seconds_total": "Seconds spent generating tokens.",
    "prompt_cache_hits_total": "Generations that reused at least one cached prompt token.",
}
GAUGES = {  # name -> help; their values come from the server's slots at each scrape
    "slots": "Slots (engine serve --parallel): sequences the server keeps, each with its own KV cache.",
    "slots_processing": "Slots running a request now.",
    "requests_waiting": "Requests queued (FIFO) until a slot is free.",
}
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # upper bounds (le) of engine_decode_batch_size's buckets


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, HTTP status) -> count
        self.totals: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()  # sequences in a batched decode step -> batches run

    def decode_batch(self, size: int) -> None:
        """Count one batched decode step of `size` sequences (server/batching.py)."""
        with self._lock:
            self.batch_sizes[size] += 1

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def generation(self, stats) -> None:
        """Add one finished (or stopped) generation's GenerationStats."""
        with self._lock:
            self.totals["prompt_tokens_total"] += stats.prompt_tokens
            self.totals["prompt_cached_tokens_total"] += stats.cached_tokens
            self.totals["generated_tokens_total"] += stats.generated_tokens
            self.totals["prompt_seconds_total"] += stats.prompt_seconds
            self.totals["generation_seconds_total"] += stats.generation_seconds
            self.totals["prompt_cache_hits_total"] += stats.cached_tokens > 0

    def render(self, gauges: dict[str, float]) -> str:
        """The counters, and the gauges' values (GAUGES' names)."""
        with self._lock:
            lines = ["# HELP engine_requests_total HTTP requests answered, by endpoint and status.",
                     "# TYPE engine_requests_total counter"]
            lines += [f'engine_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}'
                      for (endpoint, status), n in sorted(self.requests.items())]
            for name, help_text in COUNTERS.items():
                lines += [f"# HELP engine_{name} {help_text}", f"# TYPE engine_{name} counter",
                          f"engine_{name} {self.totals[name]:g}"]
            lines += ["# HELP engine_decode_batch_size Sequences per batched decode step (slots decoding together).",
                      "# TYPE engine_decode_batch_size histogram"]
            lines += [f'engine_decode_batch_size_bucket{{le="{bound}"}} '
                      f'{sum(n for size, n in self.batch_sizes.items() if size <= bound)}'
                      for bound in BATCH_SIZE_BUCKETS]
            count = sum(self.batch_sizes.values())
            lines += [f'engine_decode_batch_size_bucket{{le="+Inf"}} {count}',
                      f"engine_decode_batch_size_sum {sum(size * n for size, n in self.batch_sizes.items())}",
                      f"engine_decode_batch_size_count {count}"]
        for name, help_text in GAUGES.items():
            lines += [f"# HELP engine_{name} {help_text}", f"# TYPE engine_{name} gauge",
                      f"engine_{name} {gauges[name]:g}"]
        return "\n".join(lines) + "\n"

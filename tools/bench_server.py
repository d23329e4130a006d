"""The server's overhead: decode tokens/s streamed through HTTP vs the same generation in-process, and the
time to first token through HTTP with and without prefix reuse; with --clients, aggregate tokens/s of
concurrent clients against servers of several slots (--parallel), decode steps batched or not
(--batch-decode on,off: engine serve --no-batch-decode), instead; with --batch-steps, in-process only, the
time of one decode step of B sequences as B forwards vs one Llama.forward_batch (the model-side gain, without
HTTP, threads or sampling; the two alternate round by round, so a loaded machine slows both alike).

    python tools/bench_server.py --device cuda -n 128 -p 512 --long 32768    # the issue's target: <= 5% slower
    python tools/bench_server.py --device cpu -n 32 -p 64 --long 1024
    python tools/bench_server.py --device cpu -n 32 -p 64 --clients 1,2,4 --parallel 1,2,4
    python tools/bench_server.py --device cpu -n 64 -p 64 --clients 1,2,4 --parallel 4 --batch-decode on,off
    python tools/bench_server.py --device cpu -n 32 -p 64 --batch-steps 1,2,4,8

The server (engine.server.app on uvicorn) runs in this process on a free port; requests use httpx, greedy,
ignore_eos so that every run generates exactly -n tokens; the decode overhead is measured twice, with the client in
a child process (as a user's client: the figure to quote) and in this process (sharing the server's GIL). Decode
tokens/s through HTTP counts from the first streamed token to the last, as the in-process figure (GenerationStats) does. Aggregate tokens/s: the
tokens all clients received over the wall time from their common start to the last one's end (prefill
included); every client has its own -p-token prompt, shared with no other request of the run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import uvicorn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import engine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.server.app import create_app  # noqa: E402
from prose import prose  # noqa: E402

REPEATS = 3  # best of, for each decode figure


def start_server(llm, batch_decode: bool = True) -> tuple[uvicorn.Server, str]:
    app = create_app(lambda: llm, "bench", batch_decode)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not (server.started and app.state.engine.llm is not None):
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def stream(client: httpx.Client, prompt: list[int], n: int) -> tuple[float, float, int]:
    """(seconds to the first token, decode tokens/s after it, tokens) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with client.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["finish_reason"] is None:
                last = time.perf_counter()
                first = first or last
    return first - t0, (tokens - 1) / (last - first) if last > first else 0.0, tokens


def concurrent(url: str, prompts: list[list[int]], n: int) -> tuple[float, float]:
    """(aggregate tokens/s, slowest time to first token) of one streamed completion per prompt, all at once."""
    start = threading.Barrier(len(prompts) + 1)

    def one(prompt: list[int]) -> tuple[float, float, int]:
        with httpx.Client(base_url=url, timeout=600) as client:
            start.wait()
            return stream(client, prompt, n)

    with ThreadPoolExecutor(len(prompts)) as pool:
        runs = [pool.submit(one, prompt) for prompt in prompts]
        start.wait()
        t0 = time.perf_counter()
        results = [run.result() for run in runs]
    wall = time.perf_counter() - t0
    return sum(tokens for _, _, tokens in results) / wall, max(ttft for ttft, _, _ in results)


def aggregate_table(args, clients: list[int], parallel: list[int], batching: list[bool]) -> None:
    """Aggregate tokens/s for each number of concurrent clients against a server of each number of slots, with
    its decode steps batched or not."""
    text_ids = None
    rows = []
    for slots in parallel:
        llm = engine.load(args.model, device=args.device, dtype=args.dtype, context=args.p + args.n + 16, slots=slots)
        if text_ids is None:
            text_ids = llm.tokenize(prose())
            prompts = iter(text_ids[i:i + args.p] for i in range(0, len(text_ids) - args.p, args.p))
        for batch_decode in batching:
            server, url = start_server(llm, batch_decode)
            concurrent(url, [next(prompts)], 8)  # warm-up
            cells = [concurrent(url, [next(prompts) for _ in range(c)], args.n) for c in clients]
            rows.append((f"--parallel {slots}" + ("" if batch_decode else " --no-batch-decode"), cells))
            server.should_exit = True
    print(f"device {llm.device} ({llm.dtype}); each client: {args.p} prompt tokens, tg{args.n} streamed; "
          f"aggregate tokens/s (slowest time to first token)")
    width = max(len(name) for name, _ in rows) + 2
    print("slots \\ clients".ljust(width) + "".join(f"{c:>18}" for c in clients))
    for name, cells in rows:
        print(f"{name:<{width}}" + "".join(f"{tps:10.1f} ({ttft:4.1f} s)" for tps, ttft in cells))


def batch_steps_table(args, sizes: list[int]) -> None:
    """Seconds of a decode step of B sequences (after -p prompt tokens each), B forwards vs one batch: the best
    and the median of -n rounds (on a loaded machine the best is the model's own time, the median what it got)."""
    llm = engine.load(args.model, device=args.device, dtype=args.dtype, context=args.p + 2 * args.n + 16,
                      slots=max(sizes))
    text_ids = llm.tokenize(prose())
    print(f"device {llm.device} ({llm.dtype}); decode steps after {args.p} prompt tokens, best / median of {args.n} "
          f"rounds")
    print(f"{'sequences':>10}{'B forwards (ms)':>20}{'one batch (ms)':>20}{'speed-up':>16}")
    for b in sizes:
        caches = llm.caches[:b]
        for i, cache in enumerate(caches):
            cache.reset()
            llm.model.forward(text_ids[i * args.p:(i + 1) * args.p], cache, logits_for="none")
        alone, batched = [], []
        for step in range(args.n):
            token = [text_ids[args.p * b + step]]
            t0 = time.perf_counter()
            for cache in caches:
                llm.model.forward(token, cache, logits_for="last")
            alone.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            llm.model.forward_batch([token] * b, caches)
            batched.append(time.perf_counter() - t0)
        a, c = (np.array(times) * 1e3 for times in (alone, batched))
        print(f"{b:>10}{min(a):>11.1f} / {np.median(a):6.1f}{min(c):>11.1f} / {np.median(c):6.1f}"
              f"{min(a) / min(c):>9.2f}x / {np.median(a) / np.median(c):4.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "f16", "bf16"],
                        help="CUDA activations (random-weight files need bf16: fp16 overflows)")
    parser.add_argument("-n", type=int, default=128, help="tokens to generate (tg N)")
    parser.add_argument("-p", type=int, default=512, help="prompt tokens before the generation")
    parser.add_argument("--long", type=int, default=4096, help="prompt tokens for the time-to-first-token runs")
    parser.add_argument("--clients", default=None, help="comma-separated numbers of concurrent clients: measure "
                                                        "aggregate tokens/s instead")
    parser.add_argument("--parallel", default="1", help="with --clients: comma-separated numbers of slots")
    parser.add_argument("--batch-decode", default="on", help="with --clients: on, off or on,off (decode steps "
                                                             "batched across slots or not)")
    parser.add_argument("--batch-steps", default=None, help="comma-separated batch sizes: time decode steps "
                                                            "in-process instead")
    parser.add_argument("--client-of", default=None, help=argparse.SUPPRESS)  # client_process's child: the URL
    args = parser.parse_args()
    if args.client_of:
        run_client(args.client_of, args.n)
        return
    if args.batch_steps:
        batch_steps_table(args, [int(b) for b in args.batch_steps.split(",")])
        return
    if args.clients:
        batching = {"on": True, "off": False}
        if any(mode not in batching for mode in args.batch_decode.split(",")):
            parser.error(f"--batch-decode takes on, off or on,off, not {args.batch_decode!r}")
        aggregate_table(args, [int(c) for c in args.clients.split(",")], [int(p) for p in args.parallel.split(",")],
                        [batching[mode] for mode in args.batch_decode.split(",")])
        return

    llm = engine.load(args.model, device=args.device, dtype=args.dtype, context=max(args.p + args.n, args.long) + 16)
    text_ids = llm.tokenize(prose())
    short, long = text_ids[:args.p], text_ids[1000:1000 + args.long]
    list(llm.generate_ids(short, 8, SamplingParams(temperature=0.0)))  # warm-up (kernels, pools)
    direct = []
    for _ in range(REPEATS):
        list(llm.generate_ids(short, args.n, SamplingParams(temperature=0.0), stop_ids=[]))
        direct.append(llm.last_stats.generation_tokens_per_second)
    server, url = start_server(llm)
    with httpx.Client(base_url=url, timeout=600) as client:
        same_process = [stream(client, short, args.n)[1] for _ in range(REPEATS)]
        other_process = client_process(url, short, args.n)
        stream(client, short[:8], 1)  # the session now holds something else
        cold = stream(client, long, 1)[0]
        reused = stream(client, long, 1)[0]
    server.should_exit = True
    best_direct = max(direct)
    print(f"device {llm.device} ({llm.dtype}); tg{args.n} after {args.p} prompt tokens, best of {REPEATS}")
    print(f"{'decode in-process:':56} {best_direct:8.1f} tokens/s")
    for label, runs in (("client in another process", other_process), ("client in the server's process", same_process)):
        print(f"{'decode streamed (HTTP), ' + label + ':':56} {max(runs):8.1f} tokens/s  "
              f"({100 * (1 - max(runs) / best_direct):+.1f}% slower)")
    print(f"time to first token through HTTP, {len(long)}-token prompt: cold {cold * 1e3:.1f} ms, "
          f"prefix reused {reused * 1e3:.1f} ms ({cold / reused:.1f}x)")


def client_process(url: str, prompt: list[int], n: int) -> list[float]:
    """Decode tokens/s of REPEATS streamed completions from a client in a child process (as a user's client runs:
    not sharing the server's interpreter and its GIL)."""
    child = subprocess.run([sys.executable, __file__, "--client-of", url, "-n", str(n)], input=json.dumps(prompt),
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout)


def run_client(url: str, n: int) -> None:
    """The child of client_process: the prompt ids on stdin, the runs' tokens/s as JSON on stdout."""
    prompt = json.loads(sys.stdin.read())
    with httpx.Client(base_url=url, timeout=600) as client:
        print(json.dumps([stream(client, prompt, n)[1] for _ in range(REPEATS)]))


if __name__ == "__main__":
    main()

"""Kept decode graphs on the GPU (marker `cuda`; engine/backends/cuda/graph.py, module docstring): generations on
one session after the first replay the cache's kept graph from their first step (no eager step, no capture) and give
exactly the tokens of a decoder with nothing kept; other sampling settings capture a graph of their own; a restored
session and a by-step start (decoder.start) give the tokens they gave before. CPU twin: tests/test_kept_steps.py."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.backends.cuda.graph import GraphDecoder, KeptSteps, StepState
from engine.sampling import SamplingParams

pytestmark = pytest.mark.cuda

SETTINGS = {
    "greedy": SamplingParams(temperature=0.0),
    "greedy+penalty": SamplingParams(temperature=0.0, repeat_penalty=1.3, repeat_last_n=16),
    "seeded": SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, repeat_penalty=1.2, seed=11),
}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A tiny q8_0 model with head_dim 64 (the fused decode and flash kernels serve it)."""
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_tiny_model import VARIANTS, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("d64"), VARIANTS["d64"], gguf_types=("q8_0",), hf=False)["q8_0"]


@pytest.fixture
def counted(monkeypatch):
    """Counts of eager steps and captures (a capture runs the step once more, recorded)."""
    counts = {"run": 0, "capture": 0}
    run_step, capture = GraphDecoder._run_step, StepState.capture

    def counting_run(self):
        counts["run"] += 1
        return run_step(self)

    def counting_capture(self, step):
        counts["capture"] += 1
        return capture(self, step)

    monkeypatch.setattr(GraphDecoder, "_run_step", counting_run)
    monkeypatch.setattr(StepState, "capture", counting_capture)
    return counts


@contextmanager
def nothing_kept(monkeypatch):
    """Every decoder within starts from a new step state (the course as it ran before kept graphs)."""
    with monkeypatch.context() as patch:
        patch.setattr(KeptSteps, "take", lambda self, cache, inputs, key: None)
        yield


def turn(session, prompt, n, params) -> list[int]:
    return list(session.generate_ids(prompt, n, params, stop_ids=[]))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_later_generations_on_a_session_replay_from_the_first_step(model_path, counted, monkeypatch, name):
    params = SETTINGS[name]
    llm = engine.load(model_path, device="cuda", context=512)
    rng = np.random.default_rng(7)
    document = rng.integers(3, 384, 120).tolist()
    prompts = [document + rng.integers(3, 384, 10 + t).tolist() for t in range(4)]
    prompts.append(prompts[-1])  # the same prompt again: its last token runs as the decoder's first step (start)
    session = llm.session()
    kept = [turn(session, prompts[0], 24, params)]
    assert counted["capture"] == 1
    for prompt in prompts[1:]:
        before = dict(counted)
        kept.append(turn(session, prompt, 24, params))
        assert counted == before, f"turn {len(kept) - 1}"  # replayed from the first step: no eager step, no capture
    assert session.last_stats.cached_tokens == len(prompts[-1]) - 1
    with nothing_kept(monkeypatch):
        session = llm.session()
        assert [turn(session, prompt, 24, params) for prompt in prompts] == kept


def test_other_settings_capture_their_own_graph_and_a_new_seed_does_not(model_path, counted, monkeypatch):
    llm = engine.load(model_path, device="cuda", context=512)
    prompt = np.random.default_rng(8).integers(3, 384, 60).tolist()
    seeded = SETTINGS["seeded"]
    reseeded = SamplingParams(**{**seeded.__dict__, "seed": 12})
    course = [(prompt, seeded, 1), (prompt + [5], reseeded, 0), (prompt, SETTINGS["greedy"], 1),
              (prompt + [6, 7], seeded, 0), (prompt, SETTINGS["greedy+penalty"], 1), (prompt + [8], reseeded, 0)]
    session = llm.session()
    kept = []
    for p, params, captures in course:
        before = counted["capture"]
        kept.append(turn(session, p, 16, params))
        assert counted["capture"] == before + captures
    with nothing_kept(monkeypatch):
        session = llm.session()
        assert [turn(session, p, 16, params) for p, params, _ in course] == kept


def test_a_restored_session_and_a_by_step_start_give_the_same_tokens(model_path, tmp_path, monkeypatch):
    llm = engine.load(model_path, device="cuda", context=512)
    rng = np.random.default_rng(9)
    prompt, intruder = rng.integers(3, 384, 80).tolist(), rng.integers(3, 384, 30).tolist()

    def course(params) -> list[list[int]]:
        session = llm.session()
        tokens = [turn(session, prompt, 20, params)]
        session.save(tmp_path / "s.session")
        tokens.append(turn(session, prompt, 20, params))  # by step: the prompt's last token fed to decoder.start
        assert session.last_stats.cached_tokens == len(prompt) - 1
        tokens.append(turn(llm.session(), intruder, 10, params))  # another session takes the cache over
        session.load(tmp_path / "s.session")
        tokens.append(turn(session, prompt, 20, params))
        assert session.last_stats.cached_tokens == len(prompt) - 1
        return tokens

    for params in (SETTINGS["greedy"], SETTINGS["seeded"]):
        kept = course(params)
        with nothing_kept(monkeypatch):
            assert course(params) == kept

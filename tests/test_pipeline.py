"""A model split by layer runs as stages (engine/pipeline.py): on the CPU each stage is its own numpy backend
with its own part of the KV cache (the simulation of a multi-GPU run), and gives the unsplit model's logits."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import engine
from engine.cli import cli
from engine.backends.numpy_backend import NumpyBackend
from engine.pipeline import StagedCache
from engine.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
PROMPT = [int(i) for i in np.random.default_rng(11).integers(5, 380, 57)]
DCA = {"dca": engine.DCAConfig(chunk_size=16, local_window=4), "plain": "off"}
SPLITS = {"halves": "1,1", "thirds": "1,1,1", "uneven": "2,0,1"}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model_path(request, tmp_path_factory):
    spec = TinySpec(n_layers=5, seed=9, tied=request.param)
    return make_tiny_model(tmp_path_factory.mktemp("pipe"), spec, gguf_types=("f32",), hf=False)["f32"]


def load(path, dca, **split):
    llm = engine.load(path, dca=DCA[dca], context=96, **split)
    for stage in llm.stages:
        stage.backend.prefill_batch = 20  # several prefill batches
    return llm


@pytest.mark.parametrize("dca", sorted(DCA))
@pytest.mark.parametrize("ratios", sorted(SPLITS))
def test_split_logits_equal_unsplit(model_path, dca, ratios):
    whole = load(model_path, dca)
    split = load(model_path, dca, split_mode="layer", tensor_split=SPLITS[ratios])
    assert len(split.model.stages) == sum(float(r) > 0 for r in SPLITS[ratios].split(","))
    np.testing.assert_array_equal(split.logits(PROMPT), whole.logits(PROMPT))
    # decode: the same greedy continuation, step by step through every stage
    assert (list(split.generate_ids(PROMPT, 12, GREEDY, stop_ids=[]))
            == list(whole.generate_ids(PROMPT, 12, GREEDY, stop_ids=[])))
    np.testing.assert_array_equal(split.token_logprobs(PROMPT), whole.token_logprobs(PROMPT))


def test_stages_own_their_backend_layers_and_cache_part(model_path):
    llm = load(model_path, "dca", split_mode="layer", tensor_split="2,0,1")
    stages = llm.model.stages
    assert [list(s.layers) for s in stages] == [[0, 1, 2, 3], [4]]  # device 1 has no share
    assert [s.device for s in llm.shares] == [0, 2]
    assert len({id(s.backend) for s in stages}) == 2 and all(isinstance(s.backend, NumpyBackend) for s in stages)
    cache = llm.cache
    assert isinstance(cache, StagedCache)
    assert [part.k.shape[0] for part in cache.parts] == [4, 1]
    llm.prefill(PROMPT[:30], cache)
    assert cache.length == 30 and all(part.length == 30 for part in cache.parts)
    assert all(np.abs(part.k[:, :30]).max() > 0 for part in cache.parts)  # each stage wrote its layers' keys
    assert all(np.abs(part.k[:, 30:]).max() == 0 for part in cache.parts)


def test_handover_goes_through_receive(model_path, monkeypatch):
    llm = load(model_path, "plain", split_mode="layer", tensor_split="1,1,1")
    received = []
    for stage in llm.model.stages:
        def receive(x, own=stage.backend.receive, stage=stage):
            received.append(stage)
            return own(x)
        monkeypatch.setattr(stage.backend, "receive", receive)
    llm.prefill(PROMPT[:10], llm.new_cache())
    later = llm.model.stages[1:]
    assert received == [s for s in later for _ in ("x", "positions")]  # the first stage receives nothing


def test_session_reuse_and_session_file_on_a_split_cache(model_path, tmp_path):
    whole = load(model_path, "dca")
    split = load(model_path, "dca", split_mode="layer", tensor_split="1,1")
    expected = list(whole.generate_ids(PROMPT, 6, GREEDY, stop_ids=[]))
    session = split.session()
    assert list(session.generate_ids(PROMPT[:40], 3, GREEDY, stop_ids=[])) == list(
        whole.generate_ids(PROMPT[:40], 3, GREEDY, stop_ids=[]))
    assert list(session.generate_ids(PROMPT, 6, GREEDY, stop_ids=[])) == expected  # prefix reused, rest prefilled
    path = tmp_path / "split.session"
    session.save(path)
    other = load(model_path, "dca", split_mode="layer", tensor_split="1,1").session()
    other.load(path)
    assert other.cache.length == split.cache.length
    k, v = other.cache.host_rows()
    np.testing.assert_array_equal(k, split.cache.host_rows()[0])
    assert k.shape[0] == 5 and v.shape[0] == 5  # every layer, the parts' layers one after another


def test_batched_forward_on_a_split_model(model_path):
    """The server's batched decode steps: several sequences' rows through the stages, each on its own split cache."""
    unsplit = engine.load(model_path, dca="off", context=96, slots=2)
    split = engine.load(model_path, dca="off", context=96, slots=2, split_mode="layer", tensor_split="1,1")
    batch = [PROMPT[:7], PROMPT[10:19]]
    logits = split.model.forward_batch(batch, split.caches)
    np.testing.assert_array_equal(logits, unsplit.model.forward_batch(batch, unsplit.caches))
    assert [cache.length for cache in split.caches] == [7, 9]


def test_cpu_split_needs_a_rank_count(model_path):
    with pytest.raises(engine.ConfigError, match="needs --gpus N"):
        engine.load(model_path, split_mode="layer")
    with pytest.raises(engine.ConfigError, match="split-mode row"):
        engine.load(model_path, split_mode="row", gpus=2)


def test_generate_command_runs_the_split_and_says_so(model_path):
    args = ["generate", "-m", str(model_path), "-p", "a b c", "-n", "5", "--temp", "0", "-c", "64", "--device", "cpu"]
    whole = CliRunner().invoke(cli, args)
    split = CliRunner().invoke(cli, args + ["--split-mode", "layer", "--tensor-split", "1,1"])
    assert whole.exit_code == 0 and split.exit_code == 0, split.output
    assert split.stdout == whole.stdout
    assert "layer split: CPU rank 0 layers 0-2, CPU rank 1 layers 3-4" in split.stderr
    assert "layer split" not in whole.stderr


def test_bench_runs_a_split(model_path):
    result = CliRunner().invoke(cli, ["bench", "-m", str(model_path), "--device", "cpu", "--split-mode", "layer",
                                      "--tensor-split", "1,1", "-p", "8", "-n", "2", "-d", "4", "-r", "1", "--json",
                                      "--no-hf"])
    assert result.exit_code == 0, result.output
    assert [r["test"] for r in json.loads(result.stdout)["results"]] == ["pp8", "tg2"]

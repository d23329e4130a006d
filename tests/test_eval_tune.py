"""engine eval tune-dca: candidate grids, the score, the Pareto front and the choice, a run on the tiny model, and
the tuned settings written into a GGUF and used by DCA afterwards."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner

import engine
from engine.api import LLM
from engine.config import DCAConfig
from engine.errors import ConfigError
from engine.eval import passkey as passkey_module
from engine.eval.commands import eval_group
from engine.eval.passkey import PasskeyCell, PasskeyTrial
from engine.eval.ppl import PplCell
from engine.eval.tune import CandidateResult, candidates, choose, pareto_front, parse_sizes, scores
from prose import prose

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tiny_tune")
    paths = make_tiny_model(out, TinySpec(context_length=256), gguf_types=("f32",))
    paths["text"] = out / "prose.txt"
    paths["text"].write_text(prose()[:20_000])
    return paths


def test_sizes_are_fractions_of_l_or_token_counts():
    assert parse_sizes(None, 256, (0.5, 0.75), "chunk size") == (128, 192)
    assert parse_sizes("3/4, 100,1k", 256, (), "chunk size") == (100, 192, 1024)
    for bad in ("1/3", "x", "0", "-5", "1/0"):
        with pytest.raises(ConfigError, match="chunk size"):
            parse_sizes(bad, 256, (), "chunk size")


def test_candidates_keep_the_valid_pairs():
    grid = candidates((128, 192, 256), (16, 32, 128), 256)
    assert [(c.chunk_size, c.local_window) for c in grid] == [
        (128, 16), (128, 32), (192, 16), (192, 32), (192, 128), (256, 16), (256, 32), (256, 128)]
    with pytest.raises(ConfigError, match="exceeds the model's training context 256"):
        candidates((300,), (16,), 256)
    with pytest.raises(ConfigError, match="no candidate"):
        candidates((64,), (64,), 256)


def result(cs: int, w: int, nll: float, correct: int, of: int = 4) -> CandidateResult:
    r = CandidateResult(DCAConfig(chunk_size=cs, local_window=w))
    r.ppl_cells = [PplCell("dca", 512, nll, 511, 0.0, 0.0)]
    r.passkey_cells = [PasskeyCell("dca", 512, 0.5, [PasskeyTrial(1, "", i < correct, 512, 9) for i in range(of)])]
    return r


def test_score_front_and_choice():
    default = DCAConfig(chunk_size=192, local_window=32)
    best_ppl = result(128, 16, 2.0, 1)        # ppl e^2, retrieval 0.25
    retriever = result(256, 32, 2.05, 4)      # ppl 5.1% higher, retrieval 1.0: score 1 - 0.051
    dominated = result(192, 16, 2.1, 2)       # worse than the retriever on both
    the_default = result(192, 32, 2.0, 1)     # ties best_ppl on both: both on the front
    results = [best_ppl, retriever, dominated, the_default]
    assert pareto_front(results) == [True, True, False, True]
    s = scores(results)
    assert s[0] == pytest.approx(0.25) and s[1] == pytest.approx(1 - (2.71828 ** 0.05 - 1), abs=1e-4)
    assert choose(results, default) is retriever
    # without the retriever the middle ground wins: 0.5 - (e^0.1 - 1) = 0.395 > 0.25
    assert choose([best_ppl, dominated, the_default], default) is dominated
    assert choose([best_ppl, the_default], default) is the_default  # a tie: the default first


def test_run_prefers_the_settings_that_retrieve(tiny, tmp_path, monkeypatch):
    """An oracle reads the key when the chunk size is 192 (else answers 00000): with perplexities this close
    the tuner picks a 192 candidate, writes it into a GGUF, and DCA uses it from then on."""
    def oracle(self, prompt_ids, max_tokens=128, sampling=None, stop_ids=None):
        key = re.search(r"pass key is (\d+)", self.detokenize(prompt_ids)).group(1)
        yield from self.tokenize(f" {key if self.dca.chunk_size == 192 else '00000'}.")

    monkeypatch.setattr(LLM, "generate_ids", oracle)
    out, tuned = tmp_path / "tune.json", tmp_path / "tuned.gguf"
    result = CliRunner().invoke(eval_group, [
        "tune-dca", "-m", str(tiny["f32"]), "--text", str(tiny["text"]), "--lengths", "300,400",
        "--chunk-sizes", "1/2,3/4", "--local-windows", "32,64", "--depths", "0.2,0.8", "--json", str(out),
        "--write-gguf", str(tuned)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["style"] == "spaced" and data["depths"] == [0.2, 0.8]
    assert data["kind"] == "tune-dca" and data["complete"] and data["default"] == {"chunk_size": 192,
                                                                                   "local_window": 32}
    grid = {(c["chunk_size"], c["local_window"]): c for c in data["candidates"]}
    assert set(grid) == {(128, 32), (128, 64), (192, 32), (192, 64)}
    for (cs, _), c in grid.items():
        assert c["retrieval"] == (1.0 if cs == 192 else 0.0)
        assert [cell["length"] for cell in c["ppl_cells"]] == [300, 400]
        assert len(c["passkey_cells"]) == 4 and 1.0 < c["ppl"] < 1000
    assert data["chosen"]["chunk_size"] == 192
    chosen = DCAConfig(**data["chosen"])
    assert "<- chosen" in result.stdout and "(default)" in result.stdout

    fields = gguf.GGUFReader(tuned).fields
    assert fields["engine.dca.tuned_chunk_size"].contents() == chosen.chunk_size
    assert fields["engine.dca.tuned_local_window"].contents() == chosen.local_window
    source = gguf.GGUFReader(tiny["f32"])
    assert [(t.name, bytes(t.data)) for t in gguf.GGUFReader(tuned).tensors] == [
        (t.name, bytes(t.data)) for t in source.tensors]  # tensors copied byte for byte
    assert engine.load(tuned, context=256).dca is None  # within L: plain attention, as before
    assert engine.load(tuned, context=512).dca == chosen  # --dca auto past L: the tuned settings
    assert engine.load(tuned, context=512, dca="on", dca_chunk_size=128).dca.chunk_size == 128  # explicit wins
    ids = list(range(3, 300))
    assert (engine.load(tuned, context=512).logits(ids) == engine.load(
        tiny["f32"], context=512, dca=chosen).logits(ids)).all()


def _invoke(*args):
    return CliRunner().invoke(eval_group, ["tune-dca", *map(str, args)])


def test_refusals_come_before_any_work(tiny, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the request was refused")
    monkeypatch.setattr(passkey_module, "load", refuse)
    common = ["-m", tiny["f32"], "--text", tiny["text"], "--lengths", "300"]
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"x")
    cases = [
        ([*common, "--write-gguf", existing], "exists"),
        ([*common, "--chunk-sizes", "512"], "exceeds the model's training context 256"),
        ([*common, "--local-windows", "1/3"], "not a positive whole number"),
        (["-m", tiny["hf"], "--text", tiny["text"], "--lengths", "300", "--write-gguf", tmp_path / "x.gguf"],
         "needs a GGUF model"),
    ]
    for args, words in cases:
        result = _invoke(*args)
        assert result.exit_code != 0 and re.search(words, result.output + str(result.exception)), (args, result.output)
    assert existing.read_bytes() == b"x"
    assert _invoke(*common, "--dca-chunk-size", "96").exit_code == 2  # not an option here: the tuner picks it


def test_one_model_serves_every_candidate(tiny, monkeypatch):
    """Two loads for a whole tuning run (the perplexity context, then the passkey one), not two per candidate;
    and each candidate still runs with its own settings."""
    from engine.eval import tune as tune_module
    from engine.eval.tune import plan_tune, run_tune
    from engine.options import LoadSettings

    loads, seen = [], []
    real_load = tune_module.load
    monkeypatch.setattr(tune_module, "load", lambda **kw: loads.append(kw["context"]) or real_load(**kw))
    original = LLM.token_logprobs
    monkeypatch.setattr(LLM, "token_logprobs", lambda self, ids: seen.append(self.dca) or original(self, ids))
    plan = plan_tune(LoadSettings(model=tiny["f32"], device="cpu"), [tiny["text"]], (300,), "1/2,3/4", "32",
                     depths=(0.5,), max_new_tokens=2)
    results = list(run_tune(plan))
    assert len(results) == 2 and len(loads) == 2 and loads[0] < loads[1]
    assert seen == [DCAConfig(chunk_size=128, local_window=32), DCAConfig(chunk_size=192, local_window=32)]

"""Session files (engine/prompt_cache.py): a saved session restores exactly; other models, other settings,
truncated and corrupt files are refused with one SessionFileError; `engine generate --prompt-cache`."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import prompt_cache
from engine.errors import ConfigError
from engine.prompt_cache import SessionFileError
from engine.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
PROMPT = [int(i) for i in np.random.default_rng(3).integers(5, 380, 60)]
DCA = engine.DCAConfig(chunk_size=16, local_window=4)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), TinySpec(seed=11), gguf_types=("f32",))


@pytest.fixture(scope="module")
def saved(paths, tmp_path_factory):
    """A session file of PROMPT + 6 generated tokens (DCA on), and those tokens."""
    llm = engine.load(paths["f32"], dca=DCA, context=128)
    session = llm.session(system="sys")
    generated = list(session.generate_ids(PROMPT, 6, GREEDY, stop_ids=[]))
    session.messages.append({"role": "user", "content": "héllo"})
    path = tmp_path_factory.mktemp("files") / "doc.session"
    session.save(path)
    return path, generated, session.cache.host_rows()


def test_a_loaded_session_continues_exactly_like_a_fresh_prefill(paths, saved):
    path, generated, (k_saved, v_saved) = saved
    llm = engine.load(paths["f32"], dca=DCA, context=128)  # another instance, as in another process
    session = llm.session()
    session.load(path)
    assert session.tokens == PROMPT + generated[:-1]
    assert session.messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "héllo"}]
    k, v = session.cache.host_rows()
    assert np.array_equal(k, k_saved) and np.array_equal(v, v_saved) and k.shape[1] == len(session.tokens)
    follow_up = PROMPT + generated + PROMPT[:9]
    restored = list(session.generate_ids(follow_up, 5, GREEDY, stop_ids=[]))
    assert session.last_stats.cached_tokens == len(PROMPT) + len(generated) - 1
    assert restored == list(llm.generate_ids(follow_up, 5, GREEDY, stop_ids=[]))


def test_file_layout(saved):
    from safetensors import safe_open

    path, generated, _ = saved
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        assert f.get_tensor("tokens").dtype == np.int32 and f.get_tensor("k").shape == (2, 65, 2, 16)
        assert f.get_tensor("v").dtype == np.float32
    assert meta["format"] == "engine.session" and meta["format_version"] == "1" and meta["dtype"] == "f32"
    assert meta["dca"] == "chunk_size=16,local_window=4" and meta["context"] == "128"
    assert json.loads(meta["rope"])["theta"] == 10000.0 and len(meta["model"]) == 64


@pytest.mark.parametrize("other, fragment", [
    ({"dca": "off"}, "dca off"),
    ({"context": 96}, "context 96"),
    ({"attention_temperature": True}, "attention_temperature on"),
    ({"rope_scaling": "linear", "rope_scale": 2.0}, "rope"),
])
def test_other_settings_are_refused(paths, saved, other, fragment):
    settings = {"dca": DCA, "context": 128, **other}
    session = engine.load(paths["f32"], **settings).session()
    with pytest.raises(SessionFileError, match=fragment):
        session.load(saved[0])
    assert session.tokens == []


def test_another_model_is_refused(paths, saved, tmp_path):
    other = make_tiny_model(tmp_path, TinySpec(seed=12), gguf_types=("f32",), hf=False)["f32"]
    for model in (other, paths["hf"]):  # other weights; the same weights in another file
        with pytest.raises(SessionFileError, match="another model"):
            engine.load(model, dca=DCA, context=128).session().load(saved[0])


def test_model_identity_follows_the_header_not_the_path(paths, tmp_path):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(paths["f32"].read_bytes())
    assert prompt_cache.model_identity(copy) == prompt_cache.model_identity(paths["f32"])
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in paths["hf"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    before = prompt_cache.model_identity(folder)
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (folder / "config.json").write_text(json.dumps(config))
    assert prompt_cache.model_identity(folder) != before


def test_model_identity_hashes_the_loaders_parsed_file_without_parsing_it_again(paths, monkeypatch):
    """A loaded GGUF's identity (what session files record) from the loader's parsed file equals the one parsed from
    its path, and is computed without parsing the file again (~40 ms for a 49k-token vocabulary)."""
    from engine.loader import open_model

    loaded = open_model(paths["f32"])
    monkeypatch.setattr(prompt_cache, "_IDENTITIES", {})
    from_path = prompt_cache.model_identity(paths["f32"])
    monkeypatch.setattr(prompt_cache, "_IDENTITIES", {})
    monkeypatch.setattr(prompt_cache, "GGUFFile", lambda path: pytest.fail("parsed the GGUF again"))
    assert prompt_cache.model_identity(loaded.path, loaded.gguf) == from_path


def test_truncated_and_corrupt_files_are_refused(paths, saved, tmp_path):
    data = saved[0].read_bytes()
    session = engine.load(paths["f32"], dca=DCA, context=128).session()
    for n in (0, 7, 100, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{n}.session"
        cut.write_bytes(data[:n])
        with pytest.raises(SessionFileError, match="truncated or corrupt"):
            session.load(cut)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header["k"]["shape"][1] = 64  # keys for fewer tokens than the file has ids
    header["k"]["data_offsets"][1] -= 2 * 2 * 16 * 4
    text = json.dumps(header).encode().ljust(header_len)
    bad = tmp_path / "shape.session"
    bad.write_bytes(data[:8] + text + data[8 + header_len:])
    with pytest.raises(SessionFileError):
        session.load(bad)
    with pytest.raises(SessionFileError, match="no such session file"):
        session.load(tmp_path / "missing.session")
    assert session.tokens == [] and session.cache.length == 0


def test_save_is_atomic(paths, saved, tmp_path, monkeypatch):
    """A save that fails part way (the disk fills up after the header and the first layer's keys) is one ConfigError,
    leaves the old file as it was and no temporary file behind; so is a folder that does not exist."""
    target = tmp_path / "doc.session"
    target.write_bytes(saved[0].read_bytes())
    session = engine.load(paths["f32"], dca=DCA, context=128).session()
    list(session.generate_ids(PROMPT[:10], 2, GREEDY, stop_ids=[]))

    with pytest.raises(ConfigError, match="cannot write session file .*No such file"):
        session.save(tmp_path / "no" / "such" / "dir.session")
    layer_bytes = session.cache.host_rows()[0][0].nbytes
    partial = []

    class FullDisk:
        """The temporary file, full once the header and as many bytes as the ids and one layer's keys are in."""

        def __init__(self, file):
            self.file, self.room, self.accepted = file, None, []

        def write(self, data):
            size = memoryview(data).nbytes
            if self.room is None:  # the header: the data comes after it
                self.room = size + 4 * len(session.tokens) + layer_bytes
            if size > self.room:
                partial.append(self.accepted)
                raise OSError(28, "No space left on device")
            self.room -= size
            self.accepted.append(size)
            return self.file.write(data)

    real = prompt_cache.write_safetensors
    monkeypatch.setattr(prompt_cache, "write_safetensors", lambda f, *args: real(FullDisk(f), *args))
    with pytest.raises(ConfigError, match="No space left"):
        session.save(target)
    assert partial[0][1:] == [layer_bytes]  # the header and the first layer's keys (F32 tensors come first) went in
    assert target.read_bytes() == saved[0].read_bytes()  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.session"]  # no temporary left behind


def run(*args):
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_generate_with_prompt_cache(paths, tmp_path):
    cache = tmp_path / "prompt.session"
    args = ("generate", "-m", paths["f32"], "-p", "hello world, " * 8, "-n", "6", "--temp", "0",
            "--prompt-cache", cache)
    first, second = run(*args), run(*args)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout
    n_prompt = len(engine.load(paths["f32"]).tokenize("hello world, " * 8))
    assert f"prompt cache: 0 of {n_prompt} prompt tokens reused" in first.stderr
    assert f"prompt cache: {n_prompt - 1} of {n_prompt} prompt tokens reused" in second.stderr
    refused = run(*args[:-2], "--prompt-cache", cache, "--dca", "on", "-c", "512")
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and "Traceback" not in refused.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_cuda_session_reuse_and_file_round_trip(tmp_path, dtype):
    """On the GPU (the decoder keeps token and position in device slots): the cache after prefix reuse matches a
    fresh prefill's, and a saved and reloaded session continues bit for bit like the session it was saved from.
    Needs the default model: a real model's greedy choices are far from ties, so 16-bit paths agree on them."""
    from engine.default_model import locate_default_model

    if locate_default_model() is None:
        pytest.skip("default model not installed")
    llm = engine.load(device="cuda", dtype=dtype, dca=engine.DCAConfig(chunk_size=96, local_window=32),
                      context=1024)
    ids = llm.tokenize("The quick brown fox jumps over the lazy dog. " * 30)  # ~300 tokens: several chunks
    other = ids[:200] + llm.tokenize(" A different ending of the text, and a question about it?")
    expected = list(llm.generate_ids(other, 8, GREEDY, stop_ids=[]))
    fresh_k = llm.backend.to_numpy(llm.cache.k[:, :len(other)])  # float32 copies of the 16-bit rows
    fresh_v = llm.backend.to_numpy(llm.cache.v[:, :len(other)])
    session = llm.session()
    list(session.generate_ids(ids, 8, GREEDY, stop_ids=[]))
    reused = list(session.generate_ids(other, 8, GREEDY, stop_ids=[]))
    assert session.last_stats.cached_tokens == 200 and reused[:4] == expected[:4]
    np.testing.assert_allclose(llm.backend.to_numpy(session.cache.k[:, :len(other)]), fresh_k, rtol=0.02, atol=0.02)
    np.testing.assert_allclose(llm.backend.to_numpy(session.cache.v[:, :len(other)]), fresh_v, rtol=0.02, atol=0.02)

    session.save(tmp_path / "s.session")
    follow = session.tokens + [reused[-1]] + llm.tokenize(" Next.")
    continued = list(session.generate_ids(follow, 8, GREEDY, stop_ids=[]))
    restored = llm.session()
    llm.logits(ids[:50])  # something else uses the cache in between
    restored.load(tmp_path / "s.session")
    assert list(restored.generate_ids(follow, 8, GREEDY, stop_ids=[])) == continued
    assert restored.last_stats.cached_tokens == len(follow) - len(llm.tokenize(" Next.")) - 1

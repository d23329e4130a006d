"""engine eval table: the one table end to end on the tiny model, its cells equal to the single commands', errors.

A tiny random model (training context 256), DCA chunk_size 96 / local_window 32; lengths 500 and 600 (the
shortest the tiny tokenizer fits niah_single_1 and niah_single_2 into).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.api import LLM
from engine.errors import ConfigError
from engine.eval import ppl as ppl_module
from engine.eval.commands import eval_group
from engine.eval.table import MEASURES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TRAINING_TEXT, TinySpec, make_tiny_model  # noqa: E402

DCA_ARGS = ["--dca-chunk-size", "96", "--dca-local-window", "32"]
TASKS = ["niah_single_1", "niah_single_2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_table")
    return make_tiny_model(out, TinySpec(context_length=256), gguf_types=("f32",), hf=False)["f32"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "book.txt"
    path.write_text(TRAINING_TEXT * 4, encoding="utf-8")
    return path


def _invoke(command, *args):
    return CliRunner().invoke(eval_group, [command, *map(str, args)])


@pytest.fixture(scope="module")
def table_run(tiny, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("table") / "table.json"
    result = _invoke("table", "-m", tiny, "--text", text_file, "--lengths", "500,600", "--method", "rope,dca",
                     "--tasks", ",".join(TASKS), "--samples", "1", "--seed", "3", *DCA_ARGS, "--json", out)
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text())


def test_tables_have_a_row_per_method_and_the_columns_named(table_run):
    result, _ = table_run
    summary, per_task = result.stdout.strip().split("\n\n")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in summary.splitlines()]
    assert rows[0] == ["method"] + [f"{n} {name}" for n in (500, 600)
                                    for name in ("PPL", "passkey landmark", "passkey spaced", "RULER %")]
    assert [row[0] for row in rows[2:]] == ["rope", "dca"]
    task_rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in per_task.splitlines()]
    assert task_rows[0] == ["method", "length", *TASKS, "average"]
    assert [row[:2] for row in task_rows[2:]] == [["rope", "500"], ["rope", "600"], ["dca", "500"], ["dca", "600"]]
    assert "done: 48 cells" in result.stderr  # (1 ppl + 5 + 4 passkey depths + 2 tasks) x 2 methods x 2 lengths


def test_json_holds_every_cell(table_run):
    result, data = table_run
    assert data["kind"] == "table" and data["complete"] is True and data["device"] == "cpu"
    assert data["methods"] == ["rope", "dca"] and data["lengths"] == [500, 600] and data["tasks"] == TASKS
    keys = {(c["method"], c["length"], c["measure"], c.get("task")) for c in data["cells"]}
    assert len(keys) == len(data["cells"]) == 2 * 2 * (len(MEASURES) - 1 + len(TASKS))
    for m in ("rope", "dca"):
        for n in (500, 600):
            assert {(m, n, measure, None) for measure in MEASURES if measure != "ruler"} <= keys
            assert {(m, n, "ruler", t) for t in TASKS} <= keys
    assert data["ppl"]["kind"] == "ppl" and data["ruler"]["seed"] == 3 and data["passkey_spaced"]["seed"] == 3
    assert data["passkey_landmark"]["style"] == "landmark" and data["passkey_spaced"]["depths"] == [
        0.125, 0.375, 0.625, 0.875]
    summary = result.stdout.split("\n\n")[0].splitlines()
    ppl = {(c["method"], c["length"]): c["value"] for c in data["cells"] if c["measure"] == "ppl"}
    assert summary[2].split("|")[2].strip() == f"{ppl['rope', 500]:.2f}"


def test_cells_equal_the_single_commands(table_run, tiny, text_file, tmp_path):
    _, data = table_run
    value = {(c["method"], c["length"], c["measure"], c.get("task")): c["value"] for c in data["cells"]}
    out = tmp_path / "ppl.json"
    assert _invoke("ppl", "-m", tiny, "--text", text_file, "--lengths", "500,600", "--method", "rope,dca", *DCA_ARGS,
                   "--json", out).exit_code == 0
    for cell in json.loads(out.read_text())["cells"]:
        assert value[cell["method"], cell["length"], "ppl", None] == cell["ppl"]
    out = tmp_path / "spaced.json"
    assert _invoke("passkey", "-m", tiny, "--style", "spaced", "--lengths", "500,600", "--method", "rope,dca",
                   "--seed", "3", *DCA_ARGS, "--json", out).exit_code == 0
    single = json.loads(out.read_text())["cells"]
    assert [c["results"] for c in single] == [c["results"] for c in data["passkey_spaced"]["cells"]]
    for m in ("rope", "dca"):
        for n in (500, 600):
            trials = [r["correct"] for c in single if (c["method"], c["length"]) == (m, n) for r in c["results"]]
            assert value[m, n, "passkey_spaced", None] == sum(trials) / len(trials)
    out = tmp_path / "ruler.json"
    assert _invoke("ruler", "-m", tiny, "--lengths", "500,600", "--method", "rope,dca", "--tasks", ",".join(TASKS),
                   "--samples", "1", "--seed", "3", *DCA_ARGS, "--json", out).exit_code == 0
    ruler = json.loads(out.read_text())
    for cell in ruler["cells"]:
        assert value[cell["method"], cell["length"], "ruler", cell["task"]] == cell["score"]
        assert [r["output"] for r in cell["results"]] == [
            r["output"] for c in data["ruler"]["cells"] if (c["method"], c["length"], c["task"]) == (
                cell["method"], cell["length"], cell["task"]) for r in c["results"]]
    for average in ruler["averages"]:
        assert value[average["method"], average["length"], "ruler_average", None] == average["score"]


def test_plot(tiny, text_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "table.png"
    result = _invoke("table", "-m", tiny, "--text", text_file, "--lengths", "500", "--method", "rope",
                     "--tasks", "niah_single_1", "--samples", "1", "--plot", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,words", [
    (["--lengths", "500", "--tasks", "niah"], "unknown task 'niah'"),
    (["--lengths", "300"], "length 300 is too short for task niah_single_1"),
    (["--lengths", "500", "--method", "rope,banana"], "unknown method 'banana'"),
    (["--lengths", "500", "--samples", "0"], "--samples must be at least 1"),
    (["--lengths", "500", "--trials", "0"], "--trials must be at least 1"),
    (["--lengths", "8k"], "too few for 1 window(s) of 8192 tokens"),
    (["--lengths", "500", "--json", "/nonexistent/dir/x.json"], "does not exist"),
])
def test_refuses_before_any_work(tiny, text_file, monkeypatch, args, words):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the request was refused")
    monkeypatch.setattr(ppl_module, "load", refuse)
    result = _invoke("table", "-m", tiny, "--text", text_file, "--tasks", "niah_single_1", *args)
    assert isinstance(result.exception, ConfigError), result.output
    assert words in str(result.exception)


def test_bad_option_is_one_error_line(tiny, text_file):
    result = subprocess.run([sys.executable, "-m", "engine", "eval", "table", "-m", str(tiny), "--text",
                             str(text_file), "--lengths", "500", "--method", "rope,rope"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: method list 'rope,rope' repeats a method"]


def test_ctrl_c_keeps_what_finished(tiny, text_file, monkeypatch, tmp_path):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
        yield  # a generator, as LLM.generate_ids

    monkeypatch.setattr(LLM, "generate_ids", interrupt)
    out = tmp_path / "partial.json"
    result = _invoke("table", "-m", tiny, "--text", text_file, "--lengths", "500", "--method", "rope",
                     "--tasks", "niah_single_1", "--samples", "1", "--json", out)
    assert result.exit_code == 130, result.output
    row = [cell.strip() for cell in result.stdout.splitlines()[2].strip("|").split("|")]
    assert row[0] == "rope" and row[1] != "-" and row[2:] == ["-", "-", "-"]  # the perplexity finished, no more
    data = json.loads(out.read_text())
    assert data["complete"] is False and [c["measure"] for c in data["cells"]] == ["ppl"]
    assert "interrupted: 1 of 11 cells finished" in result.stderr

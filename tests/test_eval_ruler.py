"""engine eval ruler: the task generators against RULER's definitions, fitting, scoring, seeds, the run and the CLI."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.api import LLM
from engine.default_model import locate_default_model
from engine.errors import ConfigError
from engine.eval import ruler as ruler_module
from engine.eval.commands import eval_group
from engine.eval.report import ruler_table
from engine.eval.ruler import PromptBuilder, RulerCell, RulerResult, parse_tasks, plan_ruler, run_ruler
from engine.eval.ruler_fit import largest_fitting
from engine.eval.ruler_tasks import (NEEDLE, NOISE, TASKS, TaskEnv, fwe_counts, split_sentences,
                                     string_match_all)
from engine.eval.ruler_words import coined_words, essay_words, key_words
from engine.loader import open_model
from engine.options import LoadSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402

# the generated essay; vt's in-context example gets 6 noise paragraphs (no tokenizer needed)
ENV = TaskEnv(essay_words, lambda: 6)
NUMBER = re.compile(r"\d{7}")
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def make(task: str, n: int, length: int = 8192, seed: int = 0):
    return TASKS[task].spec.make(np.random.default_rng(seed), n, length, ENV)


@pytest.fixture(scope="module")
def default_tokenizer():
    path = locate_default_model()
    if path is None:
        pytest.skip("default model not installed")
    return open_model(path).tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_ruler")
    return make_tiny_model(out, TinySpec(context_length=256), gguf_types=("f32",), hf=False)["f32"]


# -- niah ------------------------------------------------------------------------------------------------------
def test_niah_single_1_is_rulers_prompt():
    text = make("niah_single_1", 20)
    (value,) = text.answers
    key = re.search(r"for (\S+) mentioned", text.body).group(1)
    assert key in key_words() and NUMBER.fullmatch(value)
    lines = text.body.split("\n")
    assert lines[0] == ("A special magic number is hidden within the following text. Make sure to memorize it. "
                        "I will quiz you about the number afterwards.")
    assert lines[-1] == f"What is the special magic number for {key} mentioned in the provided text?"
    assert text.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    haystack = lines[1:-1]
    assert haystack.count(NOISE) == 20 and len(haystack) == 21
    assert NEEDLE.format(type_needle_v="numbers", key=key, value=value) in haystack
    assert text.body.count(value) == 1 and text.body.count(key) == 2  # its needle and the question


@pytest.mark.parametrize("task", [t for t in TASKS if t.startswith("niah")])
def test_niah_needles_keys_values_and_answers(task):
    spec = TASKS[task].spec
    text = make(task, 400 if spec.haystack == "essay" else 30, seed=5)
    body = text.body
    value_re = UUID4 if spec.value_type == "uuids" else NUMBER
    needle_re = re.compile(r"One of the special magic (\w+) for (\S+) is: (\S+)\.")
    needles = needle_re.findall(body)
    assert {kind for kind, _, _ in needles} == {spec.value_type}
    assert all(value_re.fullmatch(v) for _, _, v in needles)
    question = body.rsplit("\n", 1)[1]
    asked = re.search(r"for (.+) mentioned", question).group(1).replace(", and ", ", ").split(", ")
    assert len(asked) == spec.num_queries and len(set(asked)) == spec.num_queries
    real = [(k, v) for _, k, v in needles if k in asked]
    assert sorted(v for _, v in real) == sorted(text.answers)
    assert len(text.answers) == spec.num_queries * spec.num_values
    for answer in text.answers:  # every expected value exactly once in the prompt
        assert body.count(answer) == 1
    keys = {k for _, k, _ in needles}
    if spec.haystack == "needle":  # distractors: n needles with other keys
        assert len(needles) == 30 + spec.n_needles and not keys & set(text.answers)
    else:
        assert len(needles) == spec.n_needles and len(keys) == max(spec.num_keys, spec.num_queries)
    if spec.key_type == "uuids":
        assert all(UUID4.fullmatch(k) for k in asked)
    else:
        assert all(k in key_words() for k in keys)
    plural = spec.num_queries * spec.num_values > 1
    assert body.startswith(f"{'Some' if plural else 'A'} special magic {spec.value_type[:None if plural else -1]}")
    assert text.answer_prefix.endswith(" are" if plural else " is")
    if spec.haystack == "noise":
        assert body.count(NOISE) == 30


def test_niah_essay_needles_sit_between_the_essays_sentences():
    text = make("niah_multivalue", 500, seed=2)
    context = text.body.split("\n")[1]
    sentences = split_sentences(context)
    needles = [s for s in sentences if s.startswith("One of the special magic numbers for ")]
    assert len(needles) == 4
    assert " ".join(s for s in sentences if s not in needles) == " ".join(essay_words(500))


def test_niah_multiquery_plural_template():
    text = make("niah_multiquery", 300, seed=1)
    keys = re.search(r"for (.+) mentioned", text.body.rsplit("\n", 1)[1]).group(1)
    assert re.fullmatch(r"\S+, \S+, \S+, and \S+", keys)
    assert text.body.startswith("Some special magic numbers are hidden within the following text. Make sure to "
                                "memorize it. I will quiz you about the numbers afterwards.\n")
    assert text.body.endswith(f"\nWhat are all the special magic numbers for {keys} mentioned in the provided text?")
    assert text.answer_prefix == f" The special magic numbers for {keys} mentioned in the provided text are"


# -- vt, cwe, fwe ----------------------------------------------------------------------------------------------
def _follow_chain(text: str, value: str) -> set[str]:
    """Names that end up holding `value`, following 'VAR X = ...' lines."""
    holds: set[str] = set()
    assignments = re.findall(r"^VAR (\w+) = (VAR (\w+)|\d+)$", text, flags=re.M)
    changed = True
    while changed:
        changed = False
        for name, source, source_name in assignments:
            if name not in holds and (source == value or source_name in holds):
                holds.add(name)
                changed = True
    return holds


def test_vt_chain_and_in_context_example():
    text = make("vt", 40, seed=3)
    icl_text, _, task_text = text.body.partition("\n\nMemorize")
    assert icl_text.startswith("Memorize and track the chain(s) of variable assignment hidden in the following "
                               "text.\n\n")
    icl_value = re.search(r"assigned the value (\d+) in the text above", icl_text).group(1)
    icl_answers = icl_text.rsplit("they are: ", 1)[1].split()
    assert set(icl_answers) == _follow_chain(icl_text, icl_value) and all(len(a) == 3 for a in icl_answers)
    assert icl_text.count(NOISE) == 6
    value = re.search(r"assigned the value (\d+) in the text above\.$", task_text).group(1)
    assert 10000 <= int(value) < 99999
    assert set(text.answers) == _follow_chain(task_text, value) and len(text.answers) == 5
    assert all(re.fullmatch(r"[A-Z]{5}", a) for a in text.answers)
    assert task_text.count(NOISE) == 40 and task_text.count(f"= {value}\n") == 1
    assert text.answer_prefix == (f" Answer: According to the chain(s) of variable assignment in the text above, "
                                  f"5 variables are assigned the value {value}, they are: ")


@pytest.mark.parametrize("length,repeats", [(2048, (6, 1)), (8192, (30, 3))])
def test_cwe_common_words_are_the_most_frequent(length, repeats):
    text = make("cwe", 60, length=length, seed=4)
    example, task = text.body.split("\nBelow is a numbered list", 1)
    assert example.startswith("Below is a numbered list of words.")
    entries = re.findall(r"(\d+)\. (\w+)", task.split("\n")[1])
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = Counter(w for _, w in entries)
    assert len(counts) == 60 and set(text.answers) == {w for w, _ in counts.most_common(10)}
    assert {counts[w] for w in text.answers} == {repeats[0]}
    assert {c for w, c in counts.items() if w not in text.answers} == {repeats[1]}
    assert task.endswith("\nQuestion: What are the 10 most common words in the above list?")
    assert text.answer_prefix == " Answer: The top 10 words that appear most often in the list are:"
    # the example is solved: its answer lists its own 10 most common words
    shown = re.findall(r"\d+\. (\w+)", example.split("\n")[1])
    solution = re.findall(r"\d+\. (\w+)", example.rsplit("list are:", 1)[1])
    assert set(solution) == {w for w, _ in Counter(shown).most_common(10)} and len(solution) == 10


def test_cwe_beyond_the_word_list_uses_coined_words():
    text = make("cwe", 2000, seed=4)
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in text.answers)
    words = coined_words(5000, np.random.default_rng(0))
    assert len(set(words)) == 5000


def test_fwe_answers_are_the_three_most_frequent_after_the_dots():
    text = make("fwe", 3000, length=8192, seed=6)
    words = text.body.split(" coded words. ", 1)[1].split("\n")[0].split()
    counts = Counter(words).most_common()
    assert counts[0][0] == "..." and tuple(w for w, _ in counts[1:4]) == text.answers
    assert counts[3][1] > counts[4][1]  # a unique top three
    assert len(counts) <= (8192 - 50) // 50 and all(re.fullmatch(r"[a-z]{6}", w) for w, _ in counts[1:])
    # the smallest haystack still has a unique top four
    smallest = fwe_counts(TASKS["fwe"].spec.min_units(), 5)
    assert smallest[4] >= 1 and all(np.diff(smallest) < 0)


# -- scoring, fitting, seeds -----------------------------------------------------------------------------------
def test_string_match_all():
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert string_match_all("the numbers are 1111111 and 2222222", ["1111111", "2222222", "3333333", "AND"]) == 0.75
    assert string_match_all(" ABCDE, fghij", ["abcde", "FGHIJ"]) == 1.0  # case-insensitive
    assert string_match_all(" 12345\x0067", ["1234567"]) == 0.0  # control characters break a match
    assert string_match_all("", ["x"]) == 0.0


def test_largest_fitting_is_maximal():
    def tokens(n):
        return 37 + 3 * n + (n % 7 == 0)
    for budget in (40, 41, 1000, 50_000):
        n = largest_fitting(tokens, budget, 1)
        assert tokens(n) <= budget < tokens(n + 1)
    assert largest_fitting(tokens, 39, 1) is None
    assert largest_fitting(tokens, 10_000, 1, guess=3000) == (10_000 - 37) // 3


@pytest.mark.parametrize("chat", [False, True])
def test_prompts_fit_the_length_on_the_default_tokenizer(default_tokenizer, chat):
    builder = PromptBuilder(default_tokenizer, chat, None, seed=0)
    for task in TASKS:
        prompt = builder.prompt(task, 2048, 0)
        total = prompt.length + TASKS[task].tokens_to_generate
        assert 0.95 * 2048 <= total <= 2048, (task, total)
        one_more = builder.encode(builder.text(task, 2048, 0, prompt.units + 1))
        assert len(one_more) + TASKS[task].tokens_to_generate > 2048, task
        text = default_tokenizer.decode(prompt.ids)
        assert text.startswith("<|im_start|>") == chat
        assert all(answer in text for answer in prompt.answers) or task == "cwe" and len(prompt.answers) == 10


def test_prompts_are_fixed_by_the_seed(default_tokenizer):
    a, b = (PromptBuilder(default_tokenizer, False, None, seed=7) for _ in range(2))
    other = PromptBuilder(default_tokenizer, False, None, seed=8)
    for task in ("niah_single_2", "vt", "fwe"):
        assert a.prompt(task, 1024, 0) == b.prompt(task, 1024, 0)
        assert a.prompt(task, 1024, 0).ids != a.prompt(task, 1024, 1).ids
        assert a.prompt(task, 1024, 0).ids != other.prompt(task, 1024, 0).ids


def test_haystack_file_feeds_the_essay_tasks(default_tokenizer, tmp_path):
    from prose import prose
    path = tmp_path / "book.txt"
    path.write_text(prose()[:40_000])
    builder = PromptBuilder(default_tokenizer, False, ruler_module.read_haystack(path), seed=0)
    text = default_tokenizer.decode(builder.prompt("niah_single_2", 1024, 0).ids)
    assert " ".join(prose().split()[:40]) in text


def test_parse_tasks():
    assert parse_tasks("vt, cwe") == ("vt", "cwe") and parse_tasks("all") == tuple(TASKS)
    for bad, words in (("vt,vt", "repeats"), ("niah", "unknown task 'niah'"), (" , ", "no task")):
        with pytest.raises(ConfigError, match=words):
            parse_tasks(bad)


# -- the run, the table, the CLI -------------------------------------------------------------------------------
def test_run_scores_the_answers(default_tokenizer, monkeypatch):
    """An oracle that copies the needle's value when DCA is on and answers nothing useful otherwise."""
    seen = []

    def oracle(self, prompt_ids, max_tokens=128, sampling=None, stop_ids=None):
        seen.append((self.dca is not None, tuple(prompt_ids), sampling.temperature, max_tokens))
        text = self.detokenize(prompt_ids)
        key = re.search(r"special magic number for (\S+) mentioned", text).group(1)
        value = re.search(rf"for {key} is: (\d+)\.", text).group(1)
        yield from self.tokenize(f" {value if self.dca is not None else 'unknown'}.")

    monkeypatch.setattr(LLM, "generate_ids", oracle)
    plan = plan_ruler(LoadSettings(device="cpu"), (700, 900), ("niah_single_1", "niah_single_2"), ("rope", "dca"),
                      samples=2, seed=1)
    cells = list(run_ruler(plan))
    assert [(c.length, c.method, c.task) for c in cells] == [
        (n, m, t) for n in (700, 900) for m in ("rope", "dca") for t in ("niah_single_1", "niah_single_2")]
    for cell in cells:
        assert cell.score == (1.0 if cell.method == "dca" else 0.0) and len(cell.results) == 2
        assert all(r.prompt_tokens + 128 <= cell.length for r in cell.results)
    assert all(temperature == 0.0 and max_tokens == 128 for _, _, temperature, max_tokens in seen)
    assert [ids for dca, ids, *_ in seen if dca] == [ids for dca, ids, *_ in seen if not dca]
    table = ruler_table(cells, (700, 900), plan.tasks, plan.methods)
    assert table.split("\n\n")[1].splitlines()[-1].split() == ["average", "100.0", "100.0"]


def test_table_marks_missing_cells_and_averages_what_finished():
    cells = [RulerCell("rope", 1024, "vt", [RulerResult(900, ("A",), "A", 1.0), RulerResult(900, ("B",), "", 0.0)]),
             RulerCell("rope", 1024, "cwe", [RulerResult(900, ("A",), "A", 1.0)])]
    rows = [line.split() for line in ruler_table(cells, (1024, 2048), ("vt", "cwe"), ("rope",)).splitlines()]
    assert rows == [["RULER", "%", "rope", "1k", "2k"], ["vt", "50.0", "-"], ["cwe", "100.0", "-"],
                    ["average", "75.0", "-"]]


def test_cli_end_to_end_on_the_default_model(default_tokenizer, tmp_path):
    out = tmp_path / "ruler.json"
    result = CliRunner().invoke(eval_group, ["ruler", "--lengths", "1000", "--tasks", "niah_single_1,vt",
                                             "--samples", "1", "--method", "rope", "--device", "cpu",
                                             "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.stdout.strip().splitlines()] == ["RULER", "niah_single_1", "vt",
                                                                                "average"]
    data = json.loads(out.read_text())
    assert {k: data[k] for k in ("kind", "complete", "tasks", "samples", "seed", "chat", "lengths", "methods")} == {
        "kind": "ruler", "complete": True, "tasks": ["niah_single_1", "vt"], "samples": 1, "seed": 42,
        "chat": True, "lengths": [1000], "methods": ["rope"]}
    assert data["tokens_to_generate"] == {"niah_single_1": 128, "vt": 30}
    for cell in data["cells"]:
        (sample,) = cell["results"]
        assert sample["score"] == string_match_all(sample["output"], sample["expected"]) == cell["score"]
        assert sample["prompt_tokens"] + data["tokens_to_generate"][cell["task"]] <= 1000
    (average,) = data["averages"]
    assert average["score"] == pytest.approx(np.mean([c["score"] for c in data["cells"]])) and average["tasks"] == 2


@pytest.mark.parametrize("args,words", [
    (["--lengths", "1k", "--tasks", "niah"], "unknown task 'niah'"),
    (["--lengths", "4x"], "not a whole number"),
    (["--lengths", "300", "--tasks", "vt"], "length 300 is too short for task vt"),
    (["--lengths", "1k", "--samples", "0"], "--samples must be at least 1"),
    (["--lengths", "1k", "--haystack", "/nonexistent/book.txt"], "cannot read haystack file"),
    (["--lengths", "1k", "--method", "rope,banana"], "unknown method 'banana'"),
])
def test_cli_refuses_before_any_work(tiny, monkeypatch, args, words):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the request was refused")
    monkeypatch.setattr(ruler_module, "load", refuse)
    result = CliRunner().invoke(eval_group, ["ruler", "-m", str(tiny), *args])
    assert isinstance(result.exception, ConfigError), result.output
    assert words in str(result.exception)


def test_cli_bad_input_is_one_error_line(tiny):
    result = subprocess.run([sys.executable, "-m", "engine", "eval", "ruler", "-m", str(tiny), "--lengths", "1k",
                             "--tasks", "vt,qa_1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: unknown task 'qa_1' (choose from " + ", ".join(TASKS) + ", or all)"]


def test_cli_ctrl_c_keeps_what_finished(default_tokenizer, monkeypatch, tmp_path):
    calls = []

    def answer_then_interrupt(self, prompt_ids, max_tokens=128, sampling=None, stop_ids=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        yield from self.tokenize(" 1234567.")

    monkeypatch.setattr(LLM, "generate_ids", answer_then_interrupt)
    out, png = tmp_path / "partial.json", tmp_path / "partial.png"
    plot = ["--plot", str(png)] if _has_matplotlib() else []
    result = CliRunner().invoke(eval_group, ["ruler", "--lengths", "700", "--tasks", "niah_single_1", "--samples",
                                             "1", "--method", "rope,dca", "--device", "cpu", "--json", str(out),
                                             *plot])
    assert result.exit_code == 130, result.output
    assert result.stdout.split("\n\n")[1].splitlines()[1].split() == ["niah_single_1", "-"]
    data = json.loads(out.read_text())
    assert data["complete"] is False and [(c["method"], c["score"]) for c in data["cells"]] == [("rope", 0.0)]
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True

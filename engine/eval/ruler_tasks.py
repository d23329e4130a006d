"""RULER's synthetic tasks (NVIDIA/RULER, scripts/synthetic.yaml + scripts/data/synthetic/*.py), written anew.

Each task turns (a seeded generator, a haystack size n, the target length) into a ``TaskText``: the user's
message, the answer prefix the prompt ends with, and the expected answers. n counts the task's haystack
units: noise paragraphs (niah noise, vt), distractor needles, essay words, cwe's distinct words, fwe's words
(before the Zipf counts are truncated). ``ruler.py`` searches n so the tokenized prompt plus the task's
generation budget fits the target length, as RULER does.

Tasks (haystack "noise": RULER's noise paragraph repeated n times, one per line; "essay": the first n words
of an essay (``--haystack FILE`` or ruler_words.essay_words), needles put between its sentences at depths
drawn from 40 evenly spaced percentages; "needle": n distractor needles, one per line):

    task              family  haystack  key     value   keys values queries   generates
    niah_single_1     niah    noise     words   numbers  1    1      1          128
    niah_single_2     niah    essay     words   numbers  1    1      1          128
    niah_single_3     niah    essay     words   uuids    1    1      1          128
    niah_multikey_1   niah    essay     words   numbers  4    1      1          128
    niah_multikey_2   niah    needle    words   numbers  1    1      1          128
    niah_multikey_3   niah    needle    uuids   uuids    1    1      1          128
    niah_multivalue   niah    essay     words   numbers  1    4      1          128
    niah_multiquery   niah    essay     words   numbers  4    1      4          128
    vt                variable tracking: 1 chain of 4 hops in noise, one in-context example     30
    cwe               common words: 10 words x 30 among others x 3 (x 6 / x 1 below 4k), one example  120
    fwe               frequent words: Zipf (alpha 2) coded words, the 3 most frequent after '...'  50

Values: numbers are 7-digit, uuids version-4 from 128 seeded bits, words 'adjective-noun' keys. Where
RULER leaves it to chance, this version makes sure that the keys and values of one prompt are distinct and
that no distractor needle repeats a real key or value, so each expected answer appears in the prompt
exactly once (niah, vt). vt's chain lines are "VAR X = VAR Y" without RULER's trailing space.

Scoring: RULER's string_match_all on the output (stripped, control characters as newlines): the fraction of
the expected strings that occur in it, case-insensitively. A cell's score is the mean over its samples.
"""
from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .ruler_words import coined_words, key_words, plain_words

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)))  # percent

NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                 "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                 "magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                "above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                "text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

VT_ICL_TOKENS = 500    # RULER's in-context example of vt: its prompt fits 500 tokens
CWE_SMALL_BELOW = 4096  # below this target length cwe uses its small setting (RULER: max_seq_length < 4096)
FWE_WORD_LETTERS = 6
FWE_TOKENS_PER_WORD = 50  # RULER: vocabulary size = (length - tokens to generate) // 50
FWE_NOISE = "..."
FWE_ALPHA = 2.0
ZETA_2 = math.pi ** 2 / 6  # the Zipf normaliser zeta(FWE_ALPHA)


@dataclass(frozen=True)
class TaskText:
    body: str                  # the user's message (any in-context example first)
    answer_prefix: str         # the prompt's end, after the chat template's assistant header in chat mode
    answers: tuple[str, ...]   # expected strings, all to be found in the output


@dataclass(frozen=True)
class TaskEnv:
    """What a task needs besides its seed and sizes: the essay haystack and the size of vt's example."""
    essay: Callable[[int], list[str]]  # the first n haystack words
    vt_icl_noises: Callable[[], int]   # noise paragraphs of vt's in-context example (ruler.py fits it once)


@dataclass(frozen=True)
class Niah:
    haystack: str  # noise | essay | needle
    key_type: str  # words | numbers | uuids
    value_type: str
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1

    @property
    def n_needles(self) -> int:
        return max(self.num_keys, self.num_queries) * self.num_values

    def min_units(self) -> int:
        return self.n_needles

    def make(self, rng: np.random.Generator, n: int, length: int, env: TaskEnv) -> TaskText:
        return niah_text(self, rng, n, env)


@dataclass(frozen=True)
class VariableTracking:
    num_chains: int = 1
    num_hops: int = 4

    def min_units(self) -> int:
        return self.num_hops + 1

    def make(self, rng: np.random.Generator, n: int, length: int, env: TaskEnv) -> TaskText:
        return vt_text(self, rng, n, env)


@dataclass(frozen=True)
class CommonWords:
    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10

    def min_units(self) -> int:
        return 2 * self.num_cw

    def make(self, rng: np.random.Generator, n: int, length: int, env: TaskEnv) -> TaskText:
        return cwe_text(self, rng, n, length)


@dataclass(frozen=True)
class FrequentWords:
    def min_units(self) -> int:
        return 100  # below, the counts of the top four coded words are not all distinct

    def make(self, rng: np.random.Generator, n: int, length: int, env: TaskEnv) -> TaskText:
        return fwe_text(rng, n, length)


@dataclass(frozen=True)
class Task:
    name: str
    spec: Niah | VariableTracking | CommonWords | FrequentWords
    tokens_to_generate: int


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("niah_single_1", Niah("noise", "words", "numbers"), 128),
    Task("niah_single_2", Niah("essay", "words", "numbers"), 128),
    Task("niah_single_3", Niah("essay", "words", "uuids"), 128),
    Task("niah_multikey_1", Niah("essay", "words", "numbers", num_keys=4), 128),
    Task("niah_multikey_2", Niah("needle", "words", "numbers"), 128),
    Task("niah_multikey_3", Niah("needle", "uuids", "uuids"), 128),
    Task("niah_multivalue", Niah("essay", "words", "numbers", num_values=4), 128),
    Task("niah_multiquery", Niah("essay", "words", "numbers", num_keys=4, num_queries=4), 128),
    Task("vt", VariableTracking(), 30),
    Task("cwe", CommonWords(), 120),
    Task("fwe", FrequentWords(), 50),
)}
TASK_IDS = {name: i for i, name in enumerate(TASKS)}  # a task's part of its samples' seeds


# -- values ------------------------------------------------------------------------------------------------
def random_value(kind: str, rng: np.random.Generator) -> str:
    if kind == "numbers":
        return str(rng.integers(10 ** 6, 10 ** 7))
    if kind == "uuids":
        return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))
    words = key_words()
    return words[rng.integers(len(words))]


def random_value_avoiding(kind: str, rng: np.random.Generator, avoid: set[str]) -> str:
    while (value := random_value(kind, rng)) in avoid:
        pass
    return value


def distinct_values(kind: str, n: int, rng: np.random.Generator, avoid: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        out.append(random_value_avoiding(kind, rng, set(avoid) | set(out)))
    return out


# -- haystacks ---------------------------------------------------------------------------------------------
def split_sentences(text: str) -> list[str]:
    """Sentences: split after '.', '!' or '?' followed by white space (RULER uses nltk's sent_tokenize)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def insert_at_depths(sentences: list[str], needles: Sequence[str], rng: np.random.Generator) -> str:
    """The essay haystack: needles (in order) between sentences at depths drawn without repeats from DEPTHS."""
    depths = rng.choice(DEPTHS, size=len(needles), replace=False)
    cuts = [0] + sorted(int(len(sentences) * d / 100) for d in depths) + [len(sentences)]
    parts: list[str] = []
    for i in range(1, len(cuts)):
        parts.extend(sentences[cuts[i - 1]:cuts[i]])
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(parts)


def insert_lines(lines: list[str], needles: Sequence[str], rng: np.random.Generator) -> str:
    """The noise / needle haystacks: each needle inserted before a distinct line drawn at random, newline-joined."""
    lines = list(lines)
    for index, needle in zip(sorted(rng.choice(len(lines), size=len(needles), replace=False), reverse=True),
                             needles):
        lines.insert(int(index), needle)
    return "\n".join(lines)


# -- niah ---------------------------------------------------------------------------------------------------
def singular(text: str) -> str:
    """RULER's rewrite of the niah template and prefix when one value is asked for."""
    return (text.replace("Some", "A").replace("are all", "is").replace("are", "is")
            .replace("answers", "answer"))


def niah_text(spec: Niah, rng: np.random.Generator, n: int, env: TaskEnv) -> TaskText:
    n_keys = max(spec.num_keys, spec.num_queries)
    keys = distinct_values(spec.key_type, n_keys, rng)
    values = distinct_values(spec.value_type, n_keys * spec.num_values, rng, avoid=set(keys))
    values_of = [values[i * spec.num_values:(i + 1) * spec.num_values] for i in range(n_keys)]
    needles = [NEEDLE.format(type_needle_v=spec.value_type, key=k, value=v) for k, vs in zip(keys, values_of)
               for v in vs]
    rng.shuffle(needles)
    if spec.haystack == "essay":
        context = insert_at_depths(split_sentences(" ".join(env.essay(n))), needles, rng)
    elif spec.haystack == "noise":
        context = insert_lines([NOISE] * n, needles, rng)
    else:  # needle: distractors, none with a key or value of this prompt
        taken = set(keys) | set(values)
        context = insert_lines([NEEDLE.format(type_needle_v=spec.value_type, key=random_value_avoiding(
            spec.key_type, rng, taken), value=random_value_avoiding(spec.value_type, rng, taken)) for _ in range(n)],
            needles, rng)
    asked = rng.choice(n_keys, size=spec.num_queries, replace=False)
    queries = [keys[i] for i in asked]
    answers = tuple(v for i in asked for v in values_of[i])
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, type_needle_v = NIAH_TEMPLATE, NIAH_PREFIX, spec.value_type
    if spec.num_queries * spec.num_values == 1:
        template, prefix, type_needle_v = singular(template), singular(prefix), type_needle_v[:-1]
    return TaskText(template.format(type_needle_v=type_needle_v, context=context, query=query),
                    prefix.format(type_needle_v=type_needle_v, query=query), answers)


# -- variable tracking --------------------------------------------------------------------------------------
def variable_names(n: int, letters: int, rng: np.random.Generator) -> list[str]:
    """n distinct names of `letters` random capitals."""
    names: list[str] = []
    while len(names) < n:
        name = "".join(chr(ord("A") + int(i)) for i in rng.integers(26, size=letters))
        if name not in names:
            names.append(name)
    return names


def vt_example(spec: VariableTracking, rng: np.random.Generator, n: int, letters: int
               ) -> tuple[str, str, tuple[str, ...]]:
    """(task text, answer prefix, the first chain's names): chains of `letters`-letter names hidden among n
    noise paragraphs, one per line, each chain's lines in order at random places."""
    names = variable_names(spec.num_chains * (spec.num_hops + 1), letters, rng)
    chains = []
    for c in range(spec.num_chains):
        chain_names = names[c * (spec.num_hops + 1):(c + 1) * (spec.num_hops + 1)]
        chain = [f"VAR {chain_names[0]} = {rng.integers(10000, 99999)}"]
        chain += [f"VAR {chain_names[j + 1]} = VAR {chain_names[j]}" for j in range(spec.num_hops)]
        chains.append(chain)
    lines = [NOISE] * n
    for chain in chains:
        at = sorted(rng.choice(len(lines), size=len(chain), replace=False))
        for j, (index, line) in enumerate(zip(at, chain)):
            lines.insert(int(index) + j, line)
    value = chains[0][0].split("=")[-1].strip()
    return (VT_TEMPLATE.format(context="\n".join(lines), query=value),
            VT_PREFIX.format(num_v=spec.num_hops + 1, query=value), tuple(names[:spec.num_hops + 1]))


def vt_text(spec: VariableTracking, rng: np.random.Generator, n: int, env: TaskEnv) -> TaskText:
    """RULER's vt: one solved example (3-letter names, fitted to VT_ICL_TOKENS), a blank line, then the task."""
    icl_text, icl_prefix, icl_answers = vt_example(spec, rng, env.vt_icl_noises(), letters=3)
    text, prefix, answers = vt_example(spec, rng, n, letters=5)
    return TaskText(f"{icl_text}{icl_prefix} {' '.join(icl_answers)}\n\n{text}", prefix, answers)


# -- common words -------------------------------------------------------------------------------------------
def numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_list(rng: np.random.Generator, n_words: int, common_repeats: int, uncommon_repeats: int, n_common: int
             ) -> tuple[str, tuple[str, ...]]:
    """(numbered word list, its common words): n_words distinct words, the first n_common repeated
    common_repeats times, the others uncommon_repeats times, shuffled."""
    vocabulary = plain_words()
    if n_words <= len(vocabulary):
        words = [vocabulary[i] for i in rng.choice(len(vocabulary), size=n_words, replace=False)]
    else:
        words = coined_words(n_words, rng)
    common, uncommon = words[:n_common], words[n_common:]
    word_list = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(word_list)
    return numbered(word_list), tuple(common)


def cwe_text(spec: CommonWords, rng: np.random.Generator, n: int, length: int) -> TaskText:
    """RULER's cwe: one solved example, a newline, then the task; smaller counts below CWE_SMALL_BELOW tokens."""
    if length < CWE_SMALL_BELOW:
        example, (repeats, uncommon_repeats) = cwe_list(rng, 20, 3, 1, spec.num_cw), (6, 1)
    else:
        example, (repeats, uncommon_repeats) = cwe_list(rng, 40, 10, 3, spec.num_cw), (spec.freq_cw, spec.freq_ucw)
    context, answers = cwe_list(rng, n, repeats, uncommon_repeats, spec.num_cw)
    shot = f"{CWE_TEMPLATE.format(context=example[0])}{CWE_PREFIX} {numbered(example[1])}"
    return TaskText(f"{shot}\n{CWE_TEMPLATE.format(context=context)}", CWE_PREFIX, answers)


# -- frequent words -----------------------------------------------------------------------------------------
def fwe_counts(n: int, vocabulary_size: int) -> np.ndarray:
    """(vocabulary_size,) int: Zipf counts n * k^-alpha / zeta(alpha), truncated, for ranks k = 1 .. size."""
    k = np.arange(1, vocabulary_size + 1, dtype=np.float64)
    return (n * k ** -FWE_ALPHA / ZETA_2).astype(np.int64)


def fwe_text(rng: np.random.Generator, n: int, length: int) -> TaskText:
    """RULER's fwe: coded words with Zipf counts, the most frequent one '...'; answer: ranks 2, 3 and 4."""
    size = max((length - TASKS["fwe"].tokens_to_generate) // FWE_TOKENS_PER_WORD, 5)
    vocabulary: list[str] = []
    while len(vocabulary) < size:
        word = "".join(chr(ord("a") + int(i)) for i in rng.integers(26, size=FWE_WORD_LETTERS))
        if word not in vocabulary:
            vocabulary.append(word)
    vocabulary[0] = FWE_NOISE
    words = [w for w, count in zip(vocabulary, fwe_counts(n, size)) for _ in range(count)]
    rng.shuffle(words)
    return TaskText(FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, tuple(vocabulary[1:4]))


# -- scoring ------------------------------------------------------------------------------------------------
def postprocess(output: str) -> str:
    """RULER's clean-up of a prediction: stripped, control characters as newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", output.strip()).strip()


def string_match_all(output: str, answers: Sequence[str]) -> float:
    """The fraction of `answers` found in the output, case-insensitively (RULER's string_match_all, in [0, 1])."""
    text = postprocess(output).lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)

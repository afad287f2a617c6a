"""Score what is served: knowledge suites, general questions and base-model regression, through the llama.cpp
engine, greedy.

A suite is a JSON list of {question, concept, required, match ("all" or "any"), forbidden}. An answer
passes when it contains the required phrases (all of them, or any one) and none of the forbidden ones,
ignoring case. A version trained without a suite gets one derived from its training data (derive_suite).
General questions (reference/general_questions.json) are a suite with known answers that is asked of the
version and of the bare base. Base regression compares the adapted model with the bare base on general
prompts: how often it still picks the base's own next token along the base's answers (teacher-forced, so
one divergence does not spoil the rest), and the perplexity of a general text sample.

Agreement is counted where the base is decided: its pick leads the runner-up by at least DECIDED_MARGIN
logits (2.7 times as likely). At near-ties the base's own pick is arbitrary; any change of weights flips
some of them (re-quantizing the default model to q8_0 alone changes 3.3% of all picks, and none of the
decided ones), so counting them would measure noise. Agreement over every position is reported beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm.auto import tqdm

from core import adapter_store, paths
from core.atomic import read_json, write_json
from core.errors import ScalpelError
from core.model_store import ModelEntry
from serving.engine import AdapterSet, Engine, GenerationParams
from serving.engine_process import EngineProcess
from training.dataset import Example
from training.report import EvalSummary, SuiteScore, add_evaluation

REFERENCE = Path(__file__).resolve().parent / "reference"
GENERAL_PROMPTS = REFERENCE / "general_prompts.json"
GENERAL_TEXT = REFERENCE / "general_text.txt"
GENERAL_QUESTIONS = REFERENCE / "general_questions.json"  # general questions with known answers
ANSWER_TOKENS = 96
GENERAL_TOKENS = 48  # enough for a short fact ("Paris", "H2O") to be said
DECIDED_MARGIN = 1.0  # logits; see the module docstring
AnyEngine = Engine | EngineProcess  # in this process, or in its own


class EvalItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1)
    concept: str = "general"
    required: list[str] = Field(default_factory=list)
    match: Literal["all", "any"] = "all"
    forbidden: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _checks_something(self):
        if not self.required and not self.forbidden:
            raise ValueError("needs at least one required or forbidden phrase")
        return self

    def passes(self, answer: str) -> bool:
        text = answer.lower()
        found = [phrase.lower() in text for phrase in self.required]
        wanted = (all(found) if self.match == "all" else any(found)) if found else True
        return wanted and not any(phrase.lower() in text for phrase in self.forbidden)


def load_suite(path: Path) -> list[EvalItem]:
    path = Path(path)
    records = read_json(path, "eval suite")
    if not isinstance(records, list) or not records:
        raise ScalpelError(f"{path}: an eval suite is a non-empty JSON list", param=str(path))
    items = []
    for i, record in enumerate(records):
        try:
            items.append(EvalItem.model_validate(record))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = f"{path}[{i}]" + "".join(f".{p}" for p in err["loc"])
            raise ScalpelError(f"{where}: {err['msg']}", param=where, code="invalid_eval_item") from exc
    return items


def write_suite(path: Path, items: list[EvalItem]) -> Path:
    """Write a suite as load_suite reads it back."""
    write_json(Path(path), [item.model_dump() for item in items])
    return Path(path)


# ----- suites derived from training data -----

DERIVED_SUFFIX = ".derived"  # a derived suite is kept as eval/<training file's stem>.derived.json
DERIVED_ITEMS = 24  # questions in a derived suite at most, spread over the concepts: every update asks them all
KEY_FACTS = 2  # facts an answer must say, at most
LONG_WORD = 7  # letters: a plain word at least this long is distinctive enough to be a fact
# Long words and capitalised words that say nothing about the answer.
_COMMON_WORDS = """
about actually against although another answer anything because before between certain different everything
example general generally however important including instead nothing particular possible probably question
several something specific therefore through together usually whether without
the this that these those there then they their them when what which while where who how why and but yes not
our its his her you your we it in on at of to a an is are was be by or as if so
"""
STOPWORDS = frozenset(_COMMON_WORDS.split())
_TOKEN = re.compile(r"[^\W_]+(?:[-'’.,][^\W_]+)*")  # words and numbers, with inner hyphens, 3.14 or 1,000
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def key_facts(question: str, answer: str, most: int = KEY_FACTS) -> list[str]:
    """The facts an answer states, as phrases a later answer to the same question must contain.

    The rule: look at the answer's first sentence (up to ".", "!", "?" or a line break), where the answer
    usually says what it is about. Every word the question already contains is set aside (repeating the
    question is not knowing the answer). The rest are ranked by how distinctive they are:
    1. numbers and words with digits, of two characters or more ("11", "1945", "H2O", "Web4x");
    2. runs of upper-case words ("FOR TWO", "TRON", "TO ONE"), of three characters or more;
    3. runs of capitalised words ("Paris", "William Shakespeare", "TSRanger"), a sentence's first word only
       when the next one is capitalised too (alone, it is capitalised because it starts the sentence);
    4. single digits ("4" in "2 + 2 = 4");
    5. other words of LONG_WORD letters or more that are not common words, longest first.
    Ties keep their order in the sentence; a possessive "'s" is dropped; at most `most` facts are kept. When
    the first sentence has none, the whole answer is looked at the same way; an answer with none at all (code,
    "Yes.") gives no facts, and its question no suite item.
    """
    asked = {token.lower() for token in _TOKEN.findall(question)}
    text = answer.strip()
    end = _SENTENCE_END.search(text)
    first = text[: end.start()] if end else text
    return _facts(first, asked, most) or (_facts(text, asked, most) if first != text else [])


_RANKS = {"number": 0, "caps": 1, "name": 2, "digit": 3, "word": 4}  # key_facts' order, most distinctive first


def _kind(word: str, asked: set[str], initial: bool) -> str | None:
    """What a word is to key_facts (None: not a fact); `initial`: it starts a sentence."""
    lower = word.lower()
    if lower in asked:
        return None
    if any(ch.isdigit() for ch in word):
        return "number" if len(word) > 1 else "digit"
    if word.isupper():
        return "caps" if len(word) > 1 else None
    if lower in STOPWORDS:
        return None
    if word[0].isupper():
        return "initial" if initial else "name"
    return "word" if len(word) >= LONG_WORD and word.isalpha() else None


def _facts(text: str, asked: set[str], most: int) -> list[str]:
    """key_facts on one stretch of text."""
    tokens: list[tuple[int, int, str | None]] = []  # start, end, kind
    for match in _TOKEN.finditer(text):
        word = re.sub(r"['’]s$", "", match.group())
        initial = not tokens or bool(_SENTENCE_END.search(text[tokens[-1][1] : match.start()] + " "))
        tokens.append((match.start(), match.start() + len(word), _kind(word, asked, initial)))
    candidates = []  # (rank, -length for plain words, position, phrase)
    i = 0
    while i < len(tokens):
        start, end, kind = tokens[i]
        j = i + 1
        if kind in ("caps", "name", "initial"):  # a run of capitalised words one space apart is one phrase
            while j < len(tokens) and tokens[j][2] in ("caps", "name") and text[tokens[j - 1][1] : tokens[j][0]] == " ":
                j += 1
            end = tokens[j - 1][1]
            if kind == "initial" and j == i + 1:  # capitalised only because it starts a sentence: a plain word
                kind = "word" if len(text[start:end]) >= LONG_WORD and text[start:end].isalpha() else None
            elif kind != "caps" or any(t[2] != "caps" for t in tokens[i:j]):
                kind = "name"
            if kind == "word" or (kind and end - start >= 3):
                candidates.append((_RANKS[kind], start - end if kind == "word" else 0, start, text[start:end]))
        elif kind is not None:
            candidates.append((_RANKS[kind], start - end if kind == "word" else 0, start, text[start:end]))
        i = j
    facts: list[str] = []
    for *_, phrase in sorted(candidates):
        if len(facts) < most and not any(phrase.lower() in f.lower() or f.lower() in phrase.lower() for f in facts):
            facts.append(phrase)
    return facts


def _first_exchange(messages: list[dict]) -> tuple[str, str] | None:
    """An example's first question and its answer (a system message aside), when it starts with one."""
    turns = [m for m in messages if m.get("role") != "system"]
    if len(turns) < 2 or turns[0].get("role") != "user" or turns[1].get("role") != "assistant":
        return None
    question, answer = turns[0].get("content"), turns[1].get("content")
    if not isinstance(question, str) or not isinstance(answer, str) or not question.strip():
        return None
    return question, answer


def derive_suite(examples: list[Example], most: int = DERIVED_ITEMS) -> list[EvalItem]:
    """A retention suite from a version's own training data, for a version trained without one: each training
    question (its first turn) with the key facts of its answer as the required phrases (key_facts, all of
    them). At most `most` questions, taken round-robin over the concepts in the data's order, so every concept
    is asked before any is asked twice; a question asked twice in the data is asked once."""
    by_concept: dict[str, list[EvalItem]] = {}
    seen: set[str] = set()
    for example in examples:
        exchange = _first_exchange(example.messages)
        if exchange is None or exchange[0].strip().lower() in seen:
            continue
        facts = key_facts(*exchange)
        if facts:
            seen.add(exchange[0].strip().lower())
            by_concept.setdefault(example.concept, []).append(
                EvalItem(question=exchange[0], concept=example.concept, required=facts)
            )
    items: list[EvalItem] = []
    depth = 0
    while len(items) < most and any(depth < len(pool) for pool in by_concept.values()):
        items += [pool[depth] for pool in by_concept.values() if depth < len(pool)][: most - len(items)]
        depth += 1
    return items


def version_suites(
    suite_files: tuple[Path, ...], examples: list[Example], source: Path
) -> tuple[dict[str, list[EvalItem]], str | None]:
    """The suites a version is judged on and kept with, by name: the given files, or, without any, one derived
    from its training data (derive_suite), named `<source's stem>.derived`; that name is returned beside them."""
    if suite_files:
        return {Path(f).stem: load_suite(Path(f)) for f in suite_files}, None
    items = derive_suite(examples)
    if not items:
        return {}, None
    name = Path(source).stem + DERIVED_SUFFIX
    return {name: items}, name


def ask(engine: AnyEngine, adapters: AdapterSet, question: str, max_tokens: int = ANSWER_TOKENS) -> str:
    """One greedy answer, exactly as the server would give it."""
    return _generate(engine, adapters, question, max_tokens)[0]


def ask_all(
    engine: AnyEngine,
    adapters: AdapterSet,
    questions: list[str],
    max_tokens: int = ANSWER_TOKENS,
    *,
    progress: bool = False,
    desc: str = "questions",
) -> list[str]:
    """ask() for every question, as many at once as the engine has KV slots: the engine decodes them together, which
    on two cores gives the same answers in about 60% of the time one after another takes."""
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, seed=0)
    bar = tqdm(total=len(questions), desc=desc, unit="question", disable=not progress, leave=False)

    stop = threading.Event()  # set after a failure: the answers still running are cancelled

    def start(question: str) -> Iterator:
        tokens = engine.chat_tokens([{"role": "user", "content": question}])
        return engine.generate(tokens, adapters, params, cancelled=stop)

    answers = [""] * len(questions)
    waiting = iter(enumerate(questions))
    running: deque[tuple[int, Iterator]] = deque()
    try:
        running.extend((i, start(q)) for i, q in itertools.islice(waiting, max(1, engine.settings.slots)))
        while running:  # the oldest read to its end, then the next question takes its place
            i, pieces = running.popleft()
            answers[i] = "".join(piece.text for piece in pieces)
            bar.update()
            following = next(waiting, None)
            if following is not None:
                running.append((following[0], start(following[1])))
    finally:
        stop.set()  # after a failure, the others end at the engine's next step; read to their ends, they free
        for _, pieces in running:  # their places in line
            with contextlib.suppress(Exception):
                for _ in pieces:
                    pass
        bar.close()
    return answers


def _generate(engine: AnyEngine, adapters: AdapterSet, question: str, max_tokens: int) -> tuple[str, list[int]]:
    tokens = engine.chat_tokens([{"role": "user", "content": question}])
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, seed=0)
    text, ids = "", []  # type: str, list[int]
    for piece in engine.generate(tokens, adapters, params):
        text += piece.text
        ids = piece.completion_ids or ids
    return text, ids


@dataclass
class SuiteResult:
    name: str
    answers: list[dict]  # question, concept, answer, passed

    @property
    def accuracy(self) -> float:
        return sum(a["passed"] for a in self.answers) / len(self.answers)

    @property
    def per_concept(self) -> dict[str, float]:
        concepts: dict[str, list[bool]] = {}
        for a in self.answers:
            concepts.setdefault(a["concept"], []).append(a["passed"])
        return {c: sum(v) / len(v) for c, v in sorted(concepts.items())}

    def as_dict(self) -> dict:
        return {"name": self.name, "accuracy": self.accuracy, "per_concept": self.per_concept, "answers": self.answers}


# How one suite is scored: run_suite generates every answer; scalpel.retention_check.SuiteChecker forces some.
SuiteRunner = Callable[[AnyEngine, AdapterSet, list[EvalItem], str], SuiteResult]


def run_suite(
    engine: AnyEngine, adapters: AdapterSet, items: list[EvalItem], name: str, *, progress: bool = False
) -> SuiteResult:
    said = ask_all(engine, adapters, [item.question for item in items], progress=progress, desc=f"suite {name}")
    answers = [
        {"question": item.question, "concept": item.concept, "answer": answer, "passed": item.passes(answer)}
        for item, answer in zip(items, said, strict=True)
    ]
    return SuiteResult(name, answers)


# ----- base regression -----


def base_reference(engine: AnyEngine, prompts: list[str] | None = None, *, progress: bool = False) -> list[dict]:
    """The bare base's greedy answers to the general prompts, recorded once per base and cached.

    With each answer, `base_choices`: the base's own pick at every answer position when the answer is
    scored teacher-forced in one batch, as base_regression scores an adapted model. llama.cpp's batched
    and one-token kernels round differently, so these differ from the generated tokens at about 2% of
    positions; comparing like with like, the bare base agrees with itself exactly. And `base_margins`:
    by how many logits each of those picks led the runner-up (see DECIDED_MARGIN).
    """
    prompts = prompts if prompts is not None else json.loads(GENERAL_PROMPTS.read_text(encoding="utf-8"))

    def record() -> list[dict]:
        reference = []
        for prompt in tqdm(
            prompts, desc="base reference (once per base)", unit="prompt", disable=not progress, leave=False
        ):
            answer, ids = _generate(engine, (), prompt, ANSWER_TOKENS)
            choices, margins = _answer_choices(engine, (), prompt, ids) if ids else ([], [])
            reference.append(
                {
                    "prompt": prompt,
                    "answer": answer,
                    "answer_ids": ids,
                    "base_choices": choices,
                    "base_margins": margins,
                }
            )
        return reference

    return _cached(engine, [prompts, ANSWER_TOKENS, "base_margins"], record)


def _cached(engine: AnyEngine, parts: list, compute: Callable[[], Any]) -> Any:
    """compute()'s result for the engine's base, computed once and kept in the state folder: the bare base
    answers greedily, the same every time. `parts` (JSON) say what was computed."""
    key = hashlib.sha256(json.dumps([engine.base.fingerprint, *parts]).encode()).hexdigest()[:16]
    cache = paths.state_dir() / "references" / f"{paths.check_name(engine.base.name, 'model')}-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    value = compute()
    write_json(cache, value)
    return value


def _answer_choices(
    engine: AnyEngine, adapters: AdapterSet, prompt: str, answer_ids: list[int]
) -> tuple[list[int], list[float]]:
    """The token the model picks at each position of the answer, teacher-forced after the chat prompt, and
    its margin over the runner-up (logits)."""
    tokens = engine.chat_tokens([{"role": "user", "content": prompt}])
    start = len(tokens)
    scores = engine.score(tokens + answer_ids, adapters)
    return [int(c) for c in scores.choices[start - 1 :]], [round(float(m), 4) for m in scores.margins[start - 1 :]]


@dataclass
class BaseRegression:
    # Along the base's answers, where the base is decided: share of positions where the adapted model picks
    # the base's token. The gate uses this one.
    agreement: float
    agreement_all_positions: float = math.nan  # the same over every position, near-ties included
    decided_share: float = math.nan  # share of positions where the base is decided
    per_prompt: list[dict] = field(default_factory=list)
    perplexity_base: float = math.nan
    perplexity: float = math.nan

    @property
    def perplexity_change(self) -> float:
        return self.perplexity / self.perplexity_base - 1

    def as_dict(self) -> dict:
        return {**asdict(self), "perplexity_change": self.perplexity_change}


def base_regression(
    engine: AnyEngine, adapters: AdapterSet, reference: list[dict], text: str | None = None, *, progress: bool = False
) -> BaseRegression:
    hits, decided, per_prompt = [], [], []
    for ref in tqdm(reference, desc="base regression", unit="prompt", disable=not progress, leave=False):
        if not ref["answer_ids"]:
            continue
        base_choices = ref["base_choices"]  # scored the same way (see base_reference)
        choices = _answer_choices(engine, adapters, ref["prompt"], ref["answer_ids"])[0]
        agrees = [a == b for a, b in zip(choices, base_choices, strict=False)]
        hits += agrees
        decided += [m >= DECIDED_MARGIN for m in ref["base_margins"]]
        per_prompt.append(
            {
                "prompt": ref["prompt"],
                "agreement": sum(agrees) / len(agrees),
                "first_divergence": agrees.index(False) if False in agrees else None,
            }
        )
    text_tokens = engine.text_tokens(text if text is not None else GENERAL_TEXT.read_text(encoding="utf-8"))
    ppl_base = math.exp(-engine.score(text_tokens, ()).logprobs.mean())
    ppl = math.exp(-engine.score(text_tokens, adapters).logprobs.mean()) if adapters else ppl_base
    counted = [hit for hit, sure in zip(hits, decided, strict=False) if sure]
    return BaseRegression(
        agreement=sum(counted) / len(counted) if counted else 1.0,
        agreement_all_positions=sum(hits) / len(hits) if hits else 1.0,
        decided_share=len(counted) / len(hits) if hits else 1.0,
        per_prompt=per_prompt,
        perplexity_base=ppl_base,
        perplexity=ppl,
    )


# ----- general questions -----


@dataclass
class GeneralScore:
    """General questions with known answers (reference/general_questions.json), answered by the version and by
    the bare base: what the base could do that the version can still do."""

    answers: list[dict]  # question, answer, passed, base_answer, base_passed

    @property
    def passed(self) -> int:
        return sum(a["passed"] for a in self.answers)

    @property
    def base_passed(self) -> int:
        return sum(a["base_passed"] for a in self.answers)

    @property
    def total(self) -> int:
        return len(self.answers)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "base_passed": self.base_passed, "total": self.total, "answers": self.answers}


def general_questions() -> list[EvalItem]:
    """The general questions with known answers."""
    return load_suite(GENERAL_QUESTIONS)


def base_answers(engine: AnyEngine, items: list[EvalItem], max_tokens: int = GENERAL_TOKENS) -> list[str]:
    """The bare base's greedy answers to a suite's questions, computed once per base and cached."""
    questions = [item.question for item in items]
    # "batched": answered as ask_all answers, several at once (the key of answers made one by one differs)
    return _cached(
        engine, [questions, max_tokens, "answers", "batched"], lambda: ask_all(engine, (), questions, max_tokens)
    )


def general_score(
    engine: AnyEngine, adapters: AdapterSet, items: list[EvalItem] | None = None, *, progress: bool = False
) -> GeneralScore:
    """The general questions, asked of the adapted model and (cached) of the bare base, each scored."""
    items = items if items is not None else general_questions()
    base = base_answers(engine, items)
    questions = [item.question for item in items]
    said = ask_all(engine, adapters, questions, GENERAL_TOKENS, progress=progress, desc="general") if adapters else base
    answers = []
    for item, base_answer, answer in zip(items, base, said, strict=True):
        answers.append(
            {
                "question": item.question,
                "answer": answer,
                "passed": item.passes(answer),
                "base_answer": base_answer,
                "base_passed": item.passes(base_answer),
            }
        )
    return GeneralScore(answers)


# ----- the report -----


@dataclass
class EvalReport:
    ref: str
    suites: list[SuiteResult]
    base: BaseRegression | None
    general: GeneralScore | None = None

    def as_dict(self) -> dict:
        return {
            "ref": self.ref,
            "suites": {s.name: s.as_dict() for s in self.suites},
            "base_regression": self.base.as_dict() if self.base else None,
            "general": self.general.as_dict() if self.general else None,
        }

    def summary(self) -> EvalSummary:
        """The scores as the training report shows them (training/report.py)."""
        return EvalSummary(
            suites=[
                SuiteScore(s.name, sum(a["passed"] for a in s.answers), len(s.answers), s.name.endswith(DERIVED_SUFFIX))
                for s in self.suites
            ],
            general_passed=self.general.passed if self.general else None,
            general_base_passed=self.general.base_passed if self.general else None,
            general_total=self.general.total if self.general else None,
            base_agreement=self.base.agreement if self.base else None,
            agreement_all_positions=self.base.agreement_all_positions if self.base else None,
            perplexity=self.base.perplexity if self.base else None,
            perplexity_base=self.base.perplexity_base if self.base else None,
        )

    def as_text(self) -> str:
        lines = [f"evaluation of {self.ref}"]
        for suite in self.suites:
            lines.append(
                f"  {suite.name}: {suite.accuracy:.0%} ({sum(a['passed'] for a in suite.answers)}/{len(suite.answers)})"
            )
            lines += [f"    {c:<36} {v:6.0%}" for c, v in suite.per_concept.items()]
        if self.general:
            lines.append(
                f"  general questions: {self.general.passed}/{self.general.total} right "
                f"(the bare base: {self.general.base_passed}/{self.general.total})"
            )
        if self.base:
            lines.append(
                f"  base regression: agreement {self.base.agreement:.1%} with the base's decided picks "
                f"({self.base.agreement_all_positions:.1%} of all picks); "
                f"perplexity {self.base.perplexity:.2f} vs {self.base.perplexity_base:.2f} "
                f"({self.base.perplexity_change:+.1%})"
            )
        return "\n".join(lines)

    def plot(self, path: Path) -> Path:
        """Accuracy per concept, one bar per concept, grouped by suite; base agreement as a last bar."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels: list[str] = []
        values: list[float] = []
        colors: list[object] = []  # matplotlib colours: RGBA tuples and names
        palette = plt.get_cmap("tab10")
        for i, suite in enumerate(self.suites):
            for concept, value in suite.per_concept.items():
                labels.append(f"{concept}\n({suite.name})" if len(self.suites) > 1 else concept)
                values.append(value * 100)
                colors.append(palette(i % 10))
        if self.general:
            labels += ["general questions", "general questions\n(the bare base)"]
            values += [
                self.general.passed / self.general.total * 100,
                self.general.base_passed / self.general.total * 100,
            ]
            colors += ["dimgrey", "lightgrey"]
        if self.base:
            labels.append("base agreement")
            values.append(self.base.agreement * 100)
            colors.append("grey")
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels) + 2), 4.5))
        bars = ax.bar(range(len(values)), values, color=colors, edgecolor="black", linewidth=0.6)
        # A 0% bar has no height: its value is written on it, so no concept disappears from the picture.
        ax.bar_label(bars, labels=[f"{v:.0f}%" for v in values], fontsize=7, padding=2)
        ax.axhline(95, color="red", linestyle="--", linewidth=1, label="95% gate")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 110)  # room above the 100% bars for their labels
        ax.set_ylabel("% passed")
        ax.set_title(f"Evaluation of {self.ref}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the plot, over no bar
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def outcome_lines(outcome: dict | None) -> list[str]:
    """A version's evaluation, as its manifest's "eval" keeps it, in a few lines (`scalpel train`, the demo)."""
    outcome = outcome or {}
    lines = []
    for name, suite in (outcome.get("suites") or {}).items():
        passed = sum(a["passed"] for a in suite["answers"])
        lines.append(f"  knowledge {name}: {passed}/{len(suite['answers'])} ({suite['accuracy']:.0%})")
    general = outcome.get("general")
    if general:
        lines.append(
            f"  general questions with known answers: {general['passed']}/{general['total']} "
            f"(the bare base: {general['base_passed']}/{general['total']})"
        )
    base = outcome.get("base_regression")
    if base:
        lines.append(
            f"  base agreement {base['agreement']:.1%} of the base's decided picks; "
            f"perplexity on general text {base['perplexity_change']:+.1%}"
        )
    return lines


def evaluate(
    engine: AnyEngine,
    adapters: AdapterSet,
    suites: dict[str, list[EvalItem]],
    ref: str,
    *,
    regression: bool = True,
    general: bool | None = None,
    progress: bool = False,
    runner: SuiteRunner | None = None,
) -> EvalReport:
    """Every suite (through `runner`, by default run_suite), then the general questions (by default when
    `regression`: both measure what is left of the base) and base regression; with `progress`, a bar per step."""
    if runner is None:
        results = [run_suite(engine, adapters, items, name, progress=progress) for name, items in suites.items()]
    else:
        results = [runner(engine, adapters, items, name) for name, items in suites.items()]
    with_general = regression if general is None else general
    score = general_score(engine, adapters, progress=progress) if with_general else None
    base = (
        base_regression(engine, adapters, base_reference(engine, progress=progress), progress=progress)
        if regression
        else None
    )
    return EvalReport(ref, results, base, score)


def evaluate_version(
    engine: AnyEngine,
    version: adapter_store.AdapterVersion,
    suites: dict[str, list[EvalItem]],
    ref: str,
    *,
    progress: bool = False,
    runner: SuiteRunner | None = None,
) -> EvalReport:
    """evaluate() on one version, a staged one too, loaded for it and unloaded after it."""
    loaded = engine.load(version)
    try:
        return evaluate(engine, ((loaded, 1.0),), suites, ref, progress=progress, runner=runner)
    finally:
        engine.unload(loaded)


def record(report: EvalReport, folder: Path, preservation: str | None = None) -> None:
    """Keep the scores in a version's folder: eval.png, and the evaluation section of its report.md (with how
    training preserved the base, in words)."""
    report.plot(folder / "eval.png")
    summary = report.summary()
    summary.preservation = preservation
    add_evaluation(summary, folder, plot="eval.png")


def judge_staged(
    base: ModelEntry,
    version: adapter_store.AdapterVersion,
    suites: dict[str, list[EvalItem]],
    *,
    progress: bool = False,
    preservation: str | None = None,
) -> EvalReport:
    """A first version's evaluation, before it is published, on an engine of its own: evaluate_version, then
    record in its folder."""
    # In its own process: after training, torch's threads in this one slow llama.cpp down about four times
    # (the demo's 14 questions: 40 s here against 10 s in a process that never trained).
    engine = EngineProcess(base)
    try:
        report = evaluate_version(engine, version, suites, f"{version.name}@next", progress=progress)
    finally:
        engine.close()
    record(report, version.path, preservation)
    return report

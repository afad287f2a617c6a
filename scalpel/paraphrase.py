"""Paraphrased training questions, so that knowledge is learned under more wordings than the ones it was given
(a user asks in their own words): the base model rewrites one question of each answer, and a rewrite is kept
only when the base finds that answer about as likely after it as after the question itself.

Written by hand because no library paraphrases with a served GGUF model and checks the rewrite against the
answer it must lead to. The check is what makes a small base usable here: SmolLM2-135M's rewrites often change
what is asked ("What codename does Project Fulzora use?" -> "In which country was Project Fulzora a satellite
operation?"), and after such a rewrite the answer "The codename of Project Fulzora is ..." becomes much less
likely, even to a base that does not know the codename.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from scalpel.evaluate import AnyEngine
from serving.sampling import GenerationParams
from training.dataset import Example

# A plain-text pattern for the base to continue, not a chat: a small instruction-tuned base asked in a chat to
# rewrite a question mostly answers it instead. The worked examples are about things every base knows, so that
# none of them leaks into what is trained.
SHOTS = (
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("Who wrote the novel Dune?", "Dune was written by whom?"),
    ("When did the Apollo 11 mission land?", "In what year did Apollo 11 touch down?"),
    ("List the planets of the solar system.", "Which planets make up the solar system?"),
)
PATTERN = "Question: {}\nIn other words: {}"
HEADER = "Each question below is followed by the same question in other words.\n\n"


class ParaphraseSettings(BaseModel):
    """How many rewrites are drawn and kept per answer, and how close to the question a kept one must be."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    per_answer: int = Field(2, ge=0)  # rewrites kept per answer, at most; 0: off
    samples: int = Field(4, ge=1)  # rewrites drawn per answer
    temperature: float = Field(0.9, gt=0)
    # How much less likely (mean log-probability per token, in nats) the answer's opening may be after a rewrite
    # than after the question it rewrites.
    max_drop: float = Field(0.5, ge=0)
    answer_tokens: int = Field(24, ge=1)  # the answer's opening, which is what the question decides
    max_tokens: int = Field(40, ge=8)  # a rewrite's length, at most
    seed: int = 0


@dataclass(frozen=True)
class Rewrite:
    """A rewrite drawn for a question, and what the check made of it."""

    text: str
    kept: bool
    reason: str  # why it was set aside; "" when kept
    drop: float | None = None  # how much less likely the answer became (nats per token), when it was scored


def question_and_answer(example: Example) -> tuple[str, str] | None:
    """The question and answer of a one-turn example (a system prompt allowed); None for anything else."""
    turns = [m for m in example.messages if m["role"] != "system"]
    if len(turns) != 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
        return None
    return turns[0]["content"], turns[1]["content"]


def questions_by_answer(examples: list[Example]) -> dict[str, list[str]]:
    """The one-turn examples' questions, grouped by their answer (in order): what is rewritten is each
    answer's first question."""
    groups: dict[str, list[str]] = {}
    for example in examples:
        pair = question_and_answer(example)
        if pair is not None:
            groups.setdefault(pair[1], []).append(pair[0])
    return groups


def names(question: str) -> list[str]:
    """The words a rewrite must keep: every capitalised word after the first (names, mostly), without a
    possessive "'s" or punctuation."""
    words = re.findall(r"[A-Za-z0-9][\w'-]*", question)[1:]
    return [re.sub(r"'s$", "", w) for w in words if w[0].isupper() or w[0].isdigit()]


def normalised(text: str) -> str:
    """A question reduced to its lowercase words, to tell a rewrite from a copy."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def clean(text: str) -> str:
    """A drawn rewrite as a question: its first line, without quotes or a "Rewritten question:" label."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = line.strip().strip("\"'“”").strip()
    line = re.sub(r"^(rewritten question|rewrite|question)\s*:\s*", "", line, flags=re.IGNORECASE)
    return line.strip().strip("\"'“”").strip()


def shape_problem(question: str, rewrite: str, taken: set[str]) -> str:
    """Why `rewrite` cannot stand for `question` on its face ("" when it can): not a question (a statement, most
    often the base answering it), a name lost, a number added, too short or too long, or a wording the data
    already has."""
    if not rewrite:
        return "empty"
    if not rewrite.endswith("?" if question.endswith("?") else ("?", ".")):
        return "not a question"
    lost = [n for n in names(question) if n not in rewrite]
    if lost:
        return f"lost {lost[0]!r}"
    if set(re.findall(r"\d+", rewrite)) - set(re.findall(r"\d+", question)):
        return "a number the question does not have"  # a made-up fact, in the question
    words, given = len(rewrite.split()), len(question.split())
    if words < 3 or words > 2 * given + 4:
        return "length"
    if normalised(rewrite) in taken:
        return "not new"
    return ""


def answer_logprob(engine: AnyEngine, question: str, answer: str, tokens: int) -> float:
    """The mean log-probability per token of the answer's opening after the question, under the bare base,
    over the tokens that are not copied from the question: a name repeated from the question is likely after
    any question that has it, so only the words around it say whether the answer fits."""
    prompt = engine.chat_tokens([{"role": "user", "content": question}])
    opening = engine.text_tokens(answer)[:tokens]
    asked = set(engine.text_tokens(question))
    scores = engine.score(prompt + opening, ())
    logprobs = scores.logprobs[len(prompt) - 1 : len(prompt) - 1 + len(opening)]
    own = [lp for token, lp in zip(opening, logprobs, strict=True) if token not in asked]
    return float(sum(own) / len(own)) if own else float(logprobs.mean())


def draw(engine: AnyEngine, question: str, settings: ParaphraseSettings, salt: int) -> Iterator[str]:
    """Up to `settings.samples` rewrites of `question` by the bare base, each from its own seed, drawn as they
    are asked for."""
    shots = "\n\n".join(PATTERN.format(asked, rewritten) for asked, rewritten in SHOTS)
    tokens = engine.text_tokens(HEADER + shots + "\n\n" + PATTERN.format(question, "").rstrip())
    for sample in range(settings.samples):
        params = GenerationParams(
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            seed=settings.seed * 1_000_003 + salt * 101 + sample,
            stop=["\n"],
        )
        yield clean("".join(piece.text for piece in engine.generate(tokens, (), params)))


def paraphrase(
    engine: AnyEngine,
    examples: list[Example],
    settings: ParaphraseSettings = ParaphraseSettings(),
    *,
    progress: bool = False,
    log: Callable[[str], object] = lambda _: None,
) -> dict[str, list[Rewrite]]:
    """For every answer of the one-turn examples, its first question's rewrites by the base, each marked kept or
    set aside (at most `per_answer` kept): answer -> rewrites. Deterministic for a seed and a base."""
    groups = questions_by_answer(examples)
    taken = {normalised(q) for questions in groups.values() for q in questions}
    out: dict[str, list[Rewrite]] = {}
    if not settings.per_answer:
        return out
    for salt, (answer, questions) in enumerate(tqdm(groups.items(), desc="paraphrases", disable=not progress)):
        question = questions[0]
        reference = None
        rewrites: list[Rewrite] = []
        for text in draw(engine, question, settings, salt):
            problem = shape_problem(question, text, taken)
            if problem:
                rewrites.append(Rewrite(text, False, problem))
                continue
            if reference is None:
                reference = answer_logprob(engine, question, answer, settings.answer_tokens)
            drop = reference - answer_logprob(engine, text, answer, settings.answer_tokens)
            if drop > settings.max_drop:
                rewrites.append(Rewrite(text, False, f"the answer became less likely ({drop:.2f} nats a token)", drop))
                continue
            taken.add(normalised(text))
            rewrites.append(Rewrite(text, True, "", drop))
            if sum(r.kept for r in rewrites) == settings.per_answer:
                break  # enough: the rest are not drawn
        out[answer] = rewrites
    kept = sum(r.kept for rewrites in out.values() for r in rewrites)
    log(f"paraphrases: {kept} kept of {sum(len(r) for r in out.values())} drawn for {len(out)} answers")
    return out


def kept(rewrites: dict[str, list[Rewrite]]) -> dict[str, list[str]]:
    """answer -> the rewrites kept for it."""
    return {answer: [r.text for r in drawn if r.kept] for answer, drawn in rewrites.items()}


def repeats_in_other_words(examples: list[Example], copies: int, questions: dict[str, list[str]]) -> list[Example]:
    """Each example `copies` times: the first as given, the others asked with the kept rewrites of its answer
    (taken in turn across the answer's examples), or as given where there are none left."""
    out = list(examples)
    turn: dict[str, int] = {}
    for _ in range(copies - 1):
        for example in examples:
            pair = question_and_answer(example)
            answer = pair[1] if pair else ""
            options = questions.get(answer, []) if pair else []
            if not options:
                out.append(example)
                continue
            index = turn.get(answer, 0)
            turn[answer] = index + 1
            out.append(_asked(example, options[index % len(options)]))
    return out


def _asked(example: Example, question: str) -> Example:
    """`example` with its question replaced."""
    messages = [dict(m) for m in example.messages]
    user = next(m for m in messages if m["role"] == "user")
    user["content"] = question
    return replace(example, messages=messages, where=f"{example.where} (paraphrased)")

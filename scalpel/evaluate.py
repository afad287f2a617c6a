"""Score what is served: knowledge suites and base-model regression, through the llama.cpp engine, greedy.

A suite is a JSON list of {question, concept, required, match ("all" or "any"), forbidden}. An answer
passes when it contains the required phrases (all of them, or any one) and none of the forbidden ones,
ignoring case. Base regression compares the adapted model with the bare base on general prompts: how
often it still picks the base's own next token along the base's answers (teacher-forced, so one
divergence does not spoil the rest), and the perplexity of a general text sample.

Agreement is counted where the base is decided: its pick leads the runner-up by at least DECIDED_MARGIN
logits (2.7 times as likely). At near-ties the base's own pick is arbitrary; any change of weights flips
some of them (re-quantizing the default model to q8_0 alone changes 3.3% of all picks, and none of the
decided ones), so counting them would measure noise. Agreement over every position is reported beside it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm.auto import tqdm

from core import paths
from core.atomic import read_json, write_json
from core.errors import ScalpelError
from serving.engine import AdapterSet, Engine, GenerationParams

REFERENCE = Path(__file__).resolve().parent / "reference"
GENERAL_PROMPTS = REFERENCE / "general_prompts.json"
GENERAL_TEXT = REFERENCE / "general_text.txt"
ANSWER_TOKENS = 96
DECIDED_MARGIN = 1.0  # logits; see the module docstring


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


def ask(engine: Engine, adapters: AdapterSet, question: str, max_tokens: int = ANSWER_TOKENS) -> str:
    """One greedy answer, exactly as the server would give it."""
    return _generate(engine, adapters, question, max_tokens)[0]


def _generate(engine: Engine, adapters: AdapterSet, question: str, max_tokens: int) -> tuple[str, list[int]]:
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


def run_suite(
    engine: Engine, adapters: AdapterSet, items: list[EvalItem], name: str, *, progress: bool = False
) -> SuiteResult:
    answers = []
    for item in tqdm(items, desc=f"suite {name}", unit="question", disable=not progress, leave=False):
        answer = ask(engine, adapters, item.question)
        answers.append(
            {"question": item.question, "concept": item.concept, "answer": answer, "passed": item.passes(answer)}
        )
    return SuiteResult(name, answers)


# ----- base regression -----


def base_reference(engine: Engine, prompts: list[str] | None = None, *, progress: bool = False) -> list[dict]:
    """The bare base's greedy answers to the general prompts, recorded once per base and cached.

    With each answer, `base_choices`: the base's own pick at every answer position when the answer is
    scored teacher-forced in one batch, as base_regression scores an adapted model. llama.cpp's batched
    and one-token kernels round differently, so these differ from the generated tokens at about 2% of
    positions; comparing like with like, the bare base agrees with itself exactly. And `base_margins`:
    by how many logits each of those picks led the runner-up (see DECIDED_MARGIN).
    """
    prompts = prompts if prompts is not None else json.loads(GENERAL_PROMPTS.read_text(encoding="utf-8"))
    key = hashlib.sha256(
        json.dumps([engine.base.fingerprint, prompts, ANSWER_TOKENS, "base_margins"]).encode()
    ).hexdigest()[:16]
    cache = paths.state_dir() / "references" / f"{paths.check_name(engine.base.name, 'model')}-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    reference = []
    for prompt in tqdm(
        prompts, desc="base reference (once per base)", unit="prompt", disable=not progress, leave=False
    ):
        answer, ids = _generate(engine, (), prompt, ANSWER_TOKENS)
        choices, margins = _answer_choices(engine, (), prompt, ids) if ids else ([], [])
        reference.append(
            {"prompt": prompt, "answer": answer, "answer_ids": ids, "base_choices": choices, "base_margins": margins}
        )
    write_json(cache, reference)
    return reference


def _answer_choices(
    engine: Engine, adapters: AdapterSet, prompt: str, answer_ids: list[int]
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
    engine: Engine, adapters: AdapterSet, reference: list[dict], text: str | None = None, *, progress: bool = False
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


# ----- the report -----


@dataclass
class EvalReport:
    ref: str
    suites: list[SuiteResult]
    base: BaseRegression | None

    def as_dict(self) -> dict:
        return {
            "ref": self.ref,
            "suites": {s.name: s.as_dict() for s in self.suites},
            "base_regression": self.base.as_dict() if self.base else None,
        }

    def as_text(self) -> str:
        lines = [f"evaluation of {self.ref}"]
        for suite in self.suites:
            lines.append(
                f"  {suite.name}: {suite.accuracy:.0%} ({sum(a['passed'] for a in suite.answers)}/{len(suite.answers)})"
            )
            lines += [f"    {c:<36} {v:6.0%}" for c, v in suite.per_concept.items()]
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


def evaluate(
    engine: Engine,
    adapters: AdapterSet,
    suites: dict[str, list[EvalItem]],
    ref: str,
    *,
    regression: bool = True,
    progress: bool = False,
) -> EvalReport:
    """Every suite, then base regression; with `progress`, a bar per step on stderr."""
    results = [run_suite(engine, adapters, items, name, progress=progress) for name, items in suites.items()]
    base = (
        base_regression(engine, adapters, base_reference(engine, progress=progress), progress=progress)
        if regression
        else None
    )
    return EvalReport(ref, results, base)

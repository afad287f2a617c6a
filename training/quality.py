"""Dataset QA before training: encodings, empty answers, duplicates, conflicts, length, concept balance."""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher

from pydantic import BaseModel, ConfigDict, Field

from training.dataset import Example

_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]{2,}")
_MOJIBAKE_CODECS = ("cp1252", "mac_roman", "latin-1")  # UTF-8 bytes wrongly decoded with these


class QualityRules(BaseModel):
    """The plan's quality metrics as thresholds; `strict` turns every warning into an error."""

    model_config = ConfigDict(extra="forbid")
    min_examples: int = Field(100, ge=0)
    min_avg_answer_words: float = Field(150, ge=0)
    max_concept_imbalance: float = Field(3.0, ge=1.0)  # largest concept / smallest concept
    near_duplicate_ratio: float = Field(0.92, gt=0, le=1)
    near_duplicate_limit: int = Field(5000, ge=0)  # pairwise check above this many examples is skipped
    strict: bool = False


@dataclass
class Finding:
    level: str  # "error" or "warning"
    code: str
    where: str  # file:line or file[index]
    message: str


@dataclass
class QualityReport:
    examples: int
    concepts: dict[str, int]
    avg_answer_words: float
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def as_dict(self) -> dict:
        return {
            "examples": self.examples,
            "concepts": self.concepts,
            "avg_answer_words": self.avg_answer_words,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "findings": [asdict(f) for f in self.findings],
        }

    def as_text(self) -> str:
        lines = [
            f"{self.examples} examples, {len(self.concepts)} concepts, "
            f"{self.avg_answer_words:.0f} words per answer on average"
        ]
        for concept, n in sorted(self.concepts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {concept:40} {n:5}")
        for f in self.findings:
            lines.append(f"{f.level}: {f.where}: {f.message} [{f.code}]")
        lines.append(f"{len(self.errors)} errors, {len(self.warnings)} warnings")
        return "\n".join(lines)


def mojibake(text: str) -> tuple[str, str] | None:
    """(garbled run, what it should read) when a run of characters is UTF-8 decoded with the wrong codec,
    like the seed's own '‚Äî' for '—'."""
    for run in _NON_ASCII_RUN.findall(text):
        for codec in _MOJIBAKE_CODECS:
            try:
                fixed = run.encode(codec).decode("utf-8")
            except (UnicodeEncodeError, UnicodeDecodeError):
                continue
            if fixed != run:
                return run, fixed
    return None


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def _prompt(example: Example) -> str:
    return "\n".join(m["content"] for m in example.messages if m["role"] != "assistant")


def _answer(example: Example) -> str:
    return "\n".join(m["content"] for m in example.messages if m["role"] == "assistant")


def check(
    examples: list[Example],
    rules: QualityRules = QualityRules(),
    token_counts: list[int] | None = None,
    max_seq_length: int | None = None,
) -> QualityReport:
    warn = "error" if rules.strict else "warning"
    findings: list[Finding] = []
    concepts: dict[str, int] = defaultdict(int)
    words = []
    by_prompt: dict[str, list[tuple[Example, str]]] = defaultdict(list)
    for ex in examples:
        concepts[ex.concept] += 1
        answer = _answer(ex)
        words.append(len(answer.split()))
        if not answer.strip():
            findings.append(Finding("error", "empty_answer", ex.where, "the answer is empty or whitespace"))
        for message in ex.messages:
            if (bad := mojibake(message["content"])) is not None:
                findings.append(
                    Finding(
                        warn,
                        "mojibake",
                        ex.where,
                        f"{message['role']} text has {bad[0]!r}, which looks like UTF-8 decoded "
                        f"with the wrong codec (probably {bad[1]!r})",
                    )
                )
                break
        by_prompt[_normalise(_prompt(ex))].append((ex, _normalise(answer)))

    for same_prompt in by_prompt.values():
        first, first_answer = same_prompt[0]
        for ex, answer in same_prompt[1:]:
            if answer == first_answer:
                findings.append(Finding(warn, "duplicate", ex.where, f"repeats {first.where}"))
            else:
                findings.append(
                    Finding(
                        warn, "conflicting_answers", ex.where, f"asks what {first.where} asks, but answers differently"
                    )
                )

    prompts = list(by_prompt)
    if len(prompts) <= rules.near_duplicate_limit:
        for i, a in enumerate(prompts):
            for b in prompts[i + 1 :]:
                if abs(len(a) - len(b)) > (1 - rules.near_duplicate_ratio) * max(len(a), len(b)):
                    continue
                if SequenceMatcher(None, a, b).ratio() >= rules.near_duplicate_ratio:
                    findings.append(
                        Finding(
                            warn,
                            "near_duplicate",
                            by_prompt[b][0][0].where,
                            f"is nearly the same question as {by_prompt[a][0][0].where}",
                        )
                    )

    if token_counts is not None and max_seq_length:
        for ex, n in zip(examples, token_counts, strict=False):
            if n > max_seq_length:
                findings.append(
                    Finding(
                        warn,
                        "too_long",
                        ex.where,
                        f"{n} tokens, over max_seq_length="
                        f"{max_seq_length}: the last {n - max_seq_length} are truncated",
                    )
                )

    avg_words = sum(words) / len(words) if words else 0.0
    if len(examples) < rules.min_examples:
        findings.append(
            Finding(
                warn,
                "few_examples",
                "dataset",
                f"{len(examples)} examples; the plan asks for at least {rules.min_examples}",
            )
        )
    if avg_words < rules.min_avg_answer_words:
        findings.append(
            Finding(
                warn,
                "short_answers",
                "dataset",
                f"answers average {avg_words:.0f} words; the plan asks for {rules.min_avg_answer_words:g}+",
            )
        )
    if len(concepts) > 1:
        largest, smallest = max(concepts.values()), min(concepts.values())
        if largest > rules.max_concept_imbalance * smallest:
            small = min(concepts, key=lambda c: concepts[c])
            big = max(concepts, key=lambda c: concepts[c])
            findings.append(
                Finding(
                    warn,
                    "concept_imbalance",
                    "dataset",
                    f"concept {big!r} has {largest} examples but {small!r} only {smallest} "
                    f"(more than {rules.max_concept_imbalance:g}x)",
                )
            )
    return QualityReport(examples=len(examples), concepts=dict(concepts), avg_answer_words=avg_words, findings=findings)

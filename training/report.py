"""The training report written beside each adapter version: Markdown plus PNG plots of loss and learning rate,
and, once the version was evaluated, its scores (add_evaluation)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class ReportInputs:
    adapter: str
    base: str
    history: list[dict]  # the HF Trainer's log_history
    config: dict
    dataset_sha256: str
    examples: int
    tokens: int  # in one epoch
    seconds: float  # the whole training call, loading and the per-concept pass included
    peak_rss_mb: float
    adapter_mb: float
    nuclear_mb: float | None  # the plan's r=32 / 7-module adapter on the same base, f32
    concept_loss: dict[str, float]
    concept_loss_on: str  # "eval data" or "training data"
    train_seconds: float = 0.0  # the optimizer steps alone (the Trainer's train_runtime)
    tokens_trained: int = 0  # tokens those steps went through
    learning_rates: list[tuple[int, float]] | None = None  # (step, lr) at every step


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [p[0] for p in points], [p[1] for p in points]


def plot_loss(history: list[dict], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, loss = _series(history, "loss")
    ax.plot(steps, loss, marker="o", markersize=3, label="train loss")
    eval_steps, eval_loss = _series(history, "eval_loss")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, marker="s", markersize=4, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on answer tokens")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_lr(history: list[dict], out: Path, every_step: list[tuple[int, float]] | None = None) -> Path:
    """The schedule at every optimizer step when it was recorded, else at the logging steps."""
    fig, ax = plt.subplots(figsize=(7, 3))
    steps, lr = (
        ([s for s, _ in every_step], [r for _, r in every_step]) if every_step else _series(history, "learning_rate")
    )
    ax.plot(steps, lr, color="tab:green")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning-rate schedule")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_concepts(concept_loss: dict[str, float], on: str, out: Path) -> Path:
    names = sorted(concept_loss, key=lambda n: concept_loss[n])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    ax.barh(names, [concept_loss[n] for n in names], color="tab:purple")
    ax.set_xlabel(f"loss on answer tokens ({on}, after training)")
    ax.set_title("Loss per concept")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(inputs: ReportInputs, folder: Path) -> Path:
    """report.md, loss.png, lr.png and concepts.png in `folder`."""
    plot_loss(inputs.history, folder / "loss.png")
    plot_lr(inputs.history, folder / "lr.png", inputs.learning_rates)
    if inputs.concept_loss:
        plot_concepts(inputs.concept_loss, inputs.concept_loss_on, folder / "concepts.png")
    _, losses = _series(inputs.history, "loss")
    size_line = f"{inputs.adapter_mb:.2f} MB (GGUF)"
    if inputs.nuclear_mb:
        size_line += (
            f" against {inputs.nuclear_mb:.1f} MB for the plan's nuclear adapter (r=32, 7 modules) "
            f"on the same base: {inputs.nuclear_mb / inputs.adapter_mb:.1f}x smaller"
        )
    # Speed counts the tokens the optimizer steps went through over the time of those steps alone: loading the
    # model and the per-concept pass are reported apart.
    tokens_per_second = inputs.tokens_trained / inputs.train_seconds if inputs.train_seconds else 0.0
    other_seconds = max(inputs.seconds - inputs.train_seconds, 0.0)
    lines = [
        f"# Training report: {inputs.adapter}",
        "",
        f"- base: {inputs.base}",
        f"- examples: {inputs.examples}, tokens per epoch: {inputs.tokens}",
        f"- loss: {losses[0]:.3f} at the first logged step, {losses[-1]:.3f} at the last" if losses else "- loss: -",
        f"- training: {inputs.train_seconds:.0f} s, {inputs.tokens_trained} tokens, {tokens_per_second:.0f} tokens/s",
        f"- around it (loading the model, the loss per concept, saving): {other_seconds:.0f} s",
        f"- peak memory (RSS): {inputs.peak_rss_mb:.0f} MB",
        f"- adapter size: {size_line}",
        f"- dataset sha256: {inputs.dataset_sha256}",
        "",
        "![loss](loss.png)",
        "",
        "![learning rate](lr.png)",
        "",
        *(["![loss per concept](concepts.png)", ""] if inputs.concept_loss else []),
        "## Config",
        "",
        "```json",
        json.dumps(inputs.config, indent=2),
        "```",
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@dataclass
class SuiteScore:
    """One knowledge suite's result."""

    name: str
    passed: int
    total: int
    derived: bool = False  # derived from the training data (no suite was given)


@dataclass
class EvalSummary:
    """A version's evaluation as the report shows it (scalpel.evaluate measures it; training cannot import it)."""

    suites: list[SuiteScore] = field(default_factory=list)
    general_passed: int | None = None  # general questions with known answers, answered right
    general_base_passed: int | None = None  # ...by the bare base
    general_total: int | None = None
    base_agreement: float | None = None  # share of the base's decided picks the version still makes
    agreement_all_positions: float | None = None
    perplexity: float | None = None  # on general text
    perplexity_base: float | None = None
    preservation: str | None = None  # how training kept the base's skills, in words


EVALUATION_HEADING = "## Evaluation"


def evaluation_lines(summary: EvalSummary, plot: str | None = None) -> list[str]:
    """The report's evaluation section: the knowledge scores, and beside them what is left of the base."""

    def share(passed: int, total: int) -> str:
        return f"{passed}/{total} ({passed / total:.0%})" if total else "-"

    lines = [
        EVALUATION_HEADING,
        "",
        "Greedy answers through llama.cpp, as the server gives them.",
        *([f"Base preservation: {summary.preservation}."] if summary.preservation else []),
        "",
        "| | this version | the bare base |",
        "|---|---|---|",
    ]
    for suite in summary.suites:
        origin = " (derived from the training data)" if suite.derived else ""
        lines.append(f"| knowledge: {suite.name}{origin} | {share(suite.passed, suite.total)} | |")
    if summary.general_total:
        lines.append(
            f"| general questions with known answers | {share(summary.general_passed or 0, summary.general_total)} "
            f"| {share(summary.general_base_passed or 0, summary.general_total)} |"
        )
    if summary.base_agreement is not None:
        lines.append(
            f"| base agreement (the base's decided next tokens, along its own answers) | {summary.base_agreement:.1%} "
            f"({summary.agreement_all_positions or 0:.1%} of all) | 100% |"
        )
    if summary.perplexity is not None and summary.perplexity_base:
        change = summary.perplexity / summary.perplexity_base - 1
        lines.append(
            f"| perplexity on general text | {summary.perplexity:.2f} ({change:+.1%}) | {summary.perplexity_base:.2f} |"
        )
    lines.append("")
    if plot:
        lines += [f"![evaluation]({plot})", ""]
    return lines


def add_evaluation(summary: EvalSummary, folder: Path, plot: str | None = None) -> Path:
    """Put the evaluation section into the folder's report.md, before its config (replacing an earlier one)."""
    path = folder / "report.md"
    lines = path.read_text(encoding="utf-8").split("\n")
    if EVALUATION_HEADING in lines:  # evaluated again: the section is replaced, up to the next heading
        start = lines.index(EVALUATION_HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        del lines[start:end]
    at = lines.index("## Config") if "## Config" in lines else len(lines)
    lines[at:at] = evaluation_lines(summary, plot)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path

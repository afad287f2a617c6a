"""Benchmark: evening updates on the default model, starting from one foundation adapter, against naive retraining.

Two arms, in the same run, from the same foundation version:
  scalpel  `scalpel update` as shipped: replay of earlier data, base-preservation examples, gates on;
  naive    plain sequential retraining: new data only, no replay, no preservation, always promoted.
Each evening's knowledge file is dropped into the arm's inbox and the inbox is processed (`scalpel update
--inbox`), so a file that was not promoted is tried again first on the next evening (up to 3 evenings).
After every update, every training-question suite so far is scored through llama.cpp (greedy), plus base
regression (the update does this itself); where the knowledge set has held-out paraphrase suites
(`<stem>.paraphrase.eval.json`, bench/knowledge_gen.py writes them), the live version is also scored on them
after each evening, outside the update and its time.

The knowledge is examples/evenings/ (a foundation and ten evenings) or a generated set:

    .venv/bin/python bench/knowledge_gen.py --concepts 100 --evenings 20 --seed 0 --out bench/results/knowledge
    .venv/bin/python bench/evenings.py --knowledge bench/results/knowledge --out bench/results/evenings_scale

    .venv/bin/python bench/evenings.py [--knowledge DIR] [--evenings N] [--out DIR] [--arms scalpel,naive]
                                       [--epochs 8] [--learning-rate LR] [--update-learning-rate LR]
                                       [--update-epochs N] [--new-repeats N] [--polish-epochs N] [--repair-epochs N]
                                       [--repair-rounds N]
                                       [--paraphrases N]
                                       [--max-seconds 450] [--replay-budget N]
                                       [--preservation-ratio R] [--preservation-loss distill|answers]
                                       [--preservation-weight W] [--candidates N] [--paraphrase-every N] [--fresh]

The run resumes: progress.json in the results folder records each arm's finished evenings (its update rows, the
live version, the paraphrase scores) and a snapshot of its inbox. Run the same command again after an
interruption and it skips what is done; an evening that was cut off is rolled back (versions it made are
deleted, the recorded live version is made live again, the inbox is restored) and run again. --fresh starts over.

Writes, per arm, the retention matrix (concept x version) of the training-question suites and of the
paraphrases as CSV, both arms as heatmaps (retention.png, paraphrases.png, concepts grouped by evening), the
time per update (updates_*.csv, update_seconds.png), accuracy per evening (accuracy.png), and summary.json and
summary.md, which check the targets (see TARGETS) as met or unmet.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EVENINGS = ROOT / "examples" / "evenings"
PARAPHRASES = ".paraphrase.eval.json"
# What the summary checks, after the last evening (issue 21).
TARGETS = {
    "median_update_seconds": ("<=", 300.0),
    "max_update_seconds": ("<=", 450.0),
    "last_five_over_first_five": ("<=", 1.25),
    "share_of_concepts_at_95": (">=", 0.95),  # on their training-question suites
    "paraphrase_accuracy": (">=", 0.80),  # every held-out paraphrase question of every concept, pooled
    "final_base_agreement": (">=", 0.95),
}


@dataclass
class Knowledge:
    """A knowledge set: a foundation and evening files, each with its training-question suite and, maybe, its
    held-out paraphrase suite."""

    root: Path
    foundation: Path
    evenings: list[Path]

    @classmethod
    def read(cls, root: Path, evenings: int | None) -> Knowledge:
        root = Path(root)
        files = sorted(f for f in root.glob("evening*.json") if not f.name.endswith(".eval.json"))
        if not (root / "foundation.json").is_file() or not files:
            raise SystemExit(f"{root}: a knowledge set needs foundation.json and evening*.json files")
        if evenings is not None and evenings > len(files):
            raise SystemExit(f"{root} has {len(files)} evenings, not {evenings}")
        return cls(root, root / "foundation.json", files[:evenings] if evenings else files)

    @staticmethod
    def suite(data: Path) -> Path:
        return data.with_name(f"{data.stem}.eval.json")

    @staticmethod
    def paraphrases(data: Path) -> Path | None:
        path = data.with_name(f"{data.stem}{PARAPHRASES}")
        return path if path.is_file() else None

    @property
    def files(self) -> list[Path]:
        """Every file of the run, the foundation first."""
        return [self.foundation, *self.evenings]

    def hashes(self) -> dict[str, str]:
        """The hash of every file the run reads, so that a resumed run can tell whether the knowledge changed."""
        return {
            f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for data in self.files
            for f in (data, self.suite(data), self.paraphrases(data))
            if f is not None
        }

    def concept_groups(self) -> list[tuple[int, list[str]]]:
        """(evening, its concepts in suite order), the foundation as evening 0: the heatmaps' row order."""
        from scalpel import evaluate

        groups = []
        for evening, data in enumerate(self.files):
            concepts = [item.concept for item in evaluate.load_suite(self.suite(data))]
            groups.append((evening, list(dict.fromkeys(concepts))))
        return groups


def _foundation(
    home: Path,
    knowledge: Knowledge,
    epochs: float | None = None,
    learning_rate: float | None = None,
    preservation_loss: str = "distill",
    preservation_weight: float = 4.0,
) -> dict:
    """The foundation adapter (with base-preservation examples, as every first version has), evaluated as evening 0."""
    from core import model_store
    from scalpel import evaluate
    from scalpel.publish import train_and_publish
    from scalpel.update_settings import PreservationSettings
    from serving.engine import Engine
    from training.config import load_config

    base = model_store.ensure_default()
    config = load_config(ROOT / "examples" / "demo_config.json").model_copy(
        update={"output_dir": "./adapters/evenings_scalpel"}
    )
    overrides: dict[str, object] = {
        k: v for k, v in (("num_epochs", epochs), ("learning_rate", learning_rate)) if v is not None
    }
    config = config.model_copy(update={"training_config": config.training_config.model_copy(update=overrides)})
    foundation, suite_file = knowledge.foundation, knowledge.suite(knowledge.foundation)
    # train_and_publish mixes the base's own answers in (0.5 per example) and sets the distillation, as
    # `scalpel train` does for every first version.
    result = train_and_publish(
        config,
        foundation,
        model=base.name,
        progress=False,
        eval_suites=(suite_file,),
        preserve=PreservationSettings(loss=preservation_loss, weight=preservation_weight),
    )
    engine = Engine(base)
    try:
        suite = {suite_file.stem: evaluate.load_suite(suite_file)}
        report = evaluate.evaluate(engine, ((engine.load(result.version), 1.0),), suite, result.version.ref)
    finally:
        engine.close()
    assert report.base is not None  # evaluate() scores base regression unless told not to
    # The naive arm starts from a byte-identical copy of the same foundation version.
    shutil.copytree(result.version.path.parent, home / "adapters" / "evenings_naive")
    return {
        "evening": 0,
        "data": foundation.stem,
        "data_evening": 0,
        "version": "v1",
        "promoted": True,
        "reasons": [],
        "seconds": result.train_seconds,
        "concepts": report.suites[0].per_concept,
        "base_agreement": report.base.agreement,
        "base_agreement_all_positions": report.base.agreement_all_positions,
        "perplexity_change": report.base.perplexity_change,
    }


def _row(arm: str, evening: int, dropped_on: dict[str, int], suites: set[str], result) -> dict:
    """One update's figures; `dropped_on` maps a knowledge file's stem to the evening it entered the inbox, and
    `suites` names the training-question suites (an update may score others beside them)."""
    data = Path(result.version.manifest.update.new_data).stem
    ev = result.eval
    base = ev.get("base_regression") or {}
    concepts = {}
    scored = ev["suites"]
    for name, suite in scored.items():
        if name in suites or not suites & set(scored):
            concepts.update(suite["per_concept"])
    return {
        "arm": arm,
        "evening": evening,
        "data": data,
        "data_evening": dropped_on[data],
        "version": result.version.version,
        "promoted": result.promoted,
        "reasons": result.reasons,
        "seconds": result.seconds,
        "concepts": concepts,
        "candidates": [
            c["version"] + ("" if c["promoted"] else " rejected: " + "; ".join(c["reasons"])) for c in result.candidates
        ],
        "base_agreement": base.get("agreement"),
        "base_agreement_all_positions": base.get("agreement_all_positions"),
        "perplexity_change": base.get("perplexity_change"),
    }


def _live_matrix(rows: list[dict], concepts: list[str]) -> list[list[float | None]]:
    """Per concept, the accuracy of the version that was live after each evening (a rejected version's
    scores are not what users got: the previous live version's scores carry over)."""
    matrix, live = [], {}
    for row in rows:
        if row["promoted"]:
            live = row["concepts"]
        matrix.append([live.get(c) for c in concepts])
    return [list(col) for col in zip(*matrix, strict=False)] if matrix else []


def _label(row: dict) -> str:
    """e7, or e8:e7 for evening 7's file tried again on evening 8 (it was not promoted on evening 7)."""
    dropped = row.get("data_evening", row["evening"])
    return f"e{row['evening']}" + (f":e{dropped}" if dropped != row["evening"] else "")


def _heatmap(
    panels: dict[str, tuple[list[list[float | None]], list[str]]],
    groups: list[tuple[int, list[str]]],
    title: str,
    path: Path,
    note: str = "* = update rejected, previous version live",
) -> None:
    """One panel per arm: concepts down (grouped by the evening that taught them), columns across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    concepts = [c for _, members in groups for c in members]
    many = len(concepts) > 40
    row_height = 0.16 if many else 0.45
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), row_height * len(concepts) + 2), squeeze=False)
    image = None
    for ax, (arm, (matrix, columns)) in zip(axes[0], panels.items(), strict=False):
        grid = np.array([[np.nan if v is None else v * 100 for v in row] for row in matrix]).reshape(
            len(concepts), len(columns)
        )
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(columns)), columns, rotation=90 if len(columns) > 14 else 0, fontsize=7)
        labels = [f"e{evening}  {c}" for evening, members in groups for c in members]
        ax.set_yticks(range(len(concepts)), labels, fontsize=5 if many else 8)
        start = 0
        for _, members in groups[:-1]:  # a line between evenings
            start += len(members)
            ax.axhline(start - 0.5, color="black", linewidth=0.5)
        ax.set_title(f"{arm}: {title}\n({note})", fontsize=9)
        if not many:
            for (i, j), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
    fig.subplots_adjust(wspace=0.7)  # room for the second panel's concept labels
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _line_plot(
    series: dict[str, list[tuple[float, float | None]]],
    ylabel: str,
    title: str,
    path: Path,
    evenings: int,
    lines: tuple = (),
) -> None:
    """One line per series over the evenings (x is the evening; two updates of one evening sit side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, points in series.items():
        known = [(x, y) for x, y in points if y is not None]
        ax.plot([x for x, _ in known], [y for _, y in known], marker="o", markersize=3, label=label)
    for (value, text), color in zip(lines, ("red", "darkorange", "purple"), strict=False):
        ax.axhline(value, color=color, linestyle="--", linewidth=1, label=text)
    ax.set_xticks(range(evenings + 1), [f"e{e}" for e in range(evenings + 1)], fontsize=7)
    ax.set_xlabel("evening")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _update_points(rows: list[dict]) -> list[tuple[float, float | None]]:
    """(x, seconds) per update: x is its evening, and the second update of an evening (a held file tried again
    first, then the new one) sits a little to the right of the first."""
    points = []
    for row in rows:
        same = [r for r in rows if r["evening"] == row["evening"]]
        points.append((row["evening"] + 0.5 * same.index(row) / len(same), row["seconds"]))
    return points


# ----- progress: what is done, so that a run resumes -----


class Progress:
    """progress.json: the run's settings and, per arm, its rows (one per update, the foundation first) and its
    nights (one per finished evening: the live version, how many versions there were, the paraphrase scores)."""

    def __init__(self, out: Path, run: dict, arms: dict | None = None) -> None:
        self.path = out / "progress.json"
        self.run = run
        self.arms: dict[str, dict[str, list]] = arms or {}

    @classmethod
    def open(cls, out: Path, run: dict, fresh: bool) -> Progress:
        path = out / "progress.json"
        if fresh or not path.is_file():
            return cls(out, run)
        saved = json.loads(path.read_text(encoding="utf-8"))
        then = saved["run"]
        differs = {k: (then.get(k), v) for k, v in run.items() if k != "files_sha256" and then.get(k) != v}
        # A run may go on to more evenings than it first had: only the files both read must be the same.
        changed = [f for f, h in run["files_sha256"].items() if then["files_sha256"].get(f, h) != h]
        if changed:
            differs["files"] = (None, "changed: " + ", ".join(changed))
        if differs:
            shown = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differs.items())
            raise SystemExit(f"{path} is a run with other settings ({shown}): pass --fresh, or another --out")
        run = {**run, "files_sha256": {**then["files_sha256"], **run["files_sha256"]}}
        return cls(out, run, saved["arms"])

    def save(self) -> None:
        from core.atomic import write_json

        write_json(self.path, {"run": self.run, "arms": self.arms})
        write_json(self.path.with_name("rows.json"), {arm: state["rows"] for arm, state in self.arms.items()})

    def rows(self, arm: str) -> list[dict]:
        return self.arms.get(arm, {}).get("rows", [])

    def nights(self, arm: str) -> list[dict]:
        return self.arms.get(arm, {}).get("nights", [])

    def done(self, arm: str, evening: int) -> bool:
        return any(n["evening"] == evening for n in self.nights(arm))

    def record(self, arm: str, rows: list[dict], night: dict) -> None:
        """An evening finished: its rows and its night, kept only with the evenings before it."""
        state = self.arms.setdefault(arm, {"rows": [], "nights": []})
        state["rows"] = [r for r in state["rows"] if r["evening"] < night["evening"]] + rows
        state["nights"] = [n for n in state["nights"] if n["evening"] < night["evening"]] + [night]
        self.save()


def _adapter(arm: str) -> str:
    return f"evenings_{arm}"


def _snapshot(home: Path, arm: str, evening: int) -> Path:
    return home / "snapshots" / f"inbox_{arm}-e{evening}"


def _restore(home: Path, arm: str, night: dict) -> None:
    """Put the arm back as it was when `night` ended: an evening cut off after it may have made versions, moved the
    live pointer and moved files out of the inbox."""
    from core import adapter_store

    name = _adapter(arm)
    root = adapter_store.root_for_name(name)
    if adapter_store.active_version(root) != night["live"]:
        adapter_store.promote(name, night["live"])
    for version in adapter_store.versions(root)[night["versions"] :]:
        print(f"resume: {name}@{version} was made by an evening that did not finish; deleting it", flush=True)
        adapter_store.delete_version(name, version)
    inbox = home / f"inbox_{arm}"
    shutil.rmtree(inbox, ignore_errors=True)
    shutil.copytree(_snapshot(home, arm, night["evening"]), inbox)  # copy2 keeps the mtimes: the inbox's order


def _end_night(home: Path, arm: str, evening: int, paraphrases: dict) -> dict:
    """The night record of an evening that finished, and the snapshot of the inbox it is resumed from."""
    from core import adapter_store

    inbox = home / f"inbox_{arm}"
    inbox.mkdir(exist_ok=True)
    snapshot = _snapshot(home, arm, evening)
    shutil.rmtree(snapshot, ignore_errors=True)
    shutil.copytree(inbox, snapshot)
    root = adapter_store.root_for_name(_adapter(arm))
    return {
        "evening": evening,
        "live": adapter_store.active_version(root),
        "versions": len(adapter_store.versions(root)),
        "paraphrases": paraphrases,
    }


def _score_paraphrases(
    arm: str, suites: dict[str, Path], earlier: dict | None, log=print
) -> tuple[dict[str, dict], float]:
    """The live version's scores on these paraphrase suites: {suite: {accuracy, items, per_concept}}, reused from
    the night before where the live version is the same (greedy answers do not change), and the seconds it took."""
    from core import adapter_store, model_store
    from scalpel import evaluate
    from serving.engine import Engine

    live = adapter_store.resolve(_adapter(arm))
    known = (earlier or {}).get("suites", {}) if (earlier or {}).get("version") == live.version else {}
    scores = {name: known[name] for name in suites if name in known}
    missing = {name: evaluate.load_suite(path) for name, path in suites.items() if name not in known}
    started = time.time()
    if missing:
        engine = Engine(model_store.get(live.manifest.require_base().name))
        try:
            ref = engine.load(live)
            report = evaluate.evaluate(engine, ((ref, 1.0),), missing, live.ref, regression=False)
        finally:
            engine.close()
        for suite in report.suites:
            scores[suite.name] = {
                "accuracy": suite.accuracy,
                "items": len(suite.answers),
                "per_concept": suite.per_concept,
                "items_per_concept": {c: sum(a["concept"] == c for a in suite.answers) for c in suite.per_concept},
            }
    seconds = time.time() - started
    if missing:
        log(f"           {arm:8} paraphrases of {live.ref}: {len(missing)} suite(s) scored in {seconds:.0f} s")
    return {name: scores[name] for name in suites}, seconds


def _paraphrase_night(arm: str, knowledge: Knowledge, evening: int, earlier: dict | None, log=print) -> dict:
    """Score the live version on the paraphrases of every file dropped so far (evening 0 is the foundation)."""
    from core import adapter_store

    suites = {}
    for data in knowledge.files[: evening + 1]:
        path = knowledge.paraphrases(data)
        if path is not None:
            suites[path.name.removesuffix(".json")] = path
    if not suites:
        return {}
    scores, seconds = _score_paraphrases(arm, suites, earlier, log)
    version = adapter_store.resolve(_adapter(arm)).version
    return {"version": version, "suites": scores, "seconds": seconds}


def _paraphrase_matrix(nights: list[dict], concepts: list[str]) -> tuple[list[list[float | None]], list[str]]:
    """Per concept, the live version's paraphrase accuracy after each evening that scored them."""
    scored = [n for n in nights if n.get("paraphrases")]
    columns = [f"e{n['evening']}_{n['paraphrases']['version']}" for n in scored]
    matrix = []
    for concept in concepts:
        row = []
        for night in scored:
            value = None
            for suite in night["paraphrases"]["suites"].values():
                if concept in suite["per_concept"]:
                    value = suite["per_concept"][concept]
            row.append(value)
        matrix.append(row)
    return matrix, columns


def _pooled(paraphrases: dict) -> float | None:
    """The share of every paraphrase question answered right."""
    suites = (paraphrases or {}).get("suites", {}).values()
    items = sum(s["items"] for s in suites)
    return sum(s["accuracy"] * s["items"] for s in suites) / items if items else None


def _verdict(name: str, value: float | None) -> dict:
    op, target = TARGETS[name]
    met = value is not None and (value <= target if op == "<=" else value >= target)
    return {"value": value, "target": f"{op} {target:g}", "met": met}


def summarise(rows: list[dict], nights: list[dict], concepts: list[str], files: int) -> dict:
    """An arm's figures after its last evening, and each target met or not."""
    final = [values[-1] if values else None for values in _live_matrix(rows, concepts)]
    updates = rows[1:]  # rows[0] is the foundation
    seconds = [r["seconds"] for r in updates]
    live_rows = [r for r in rows if r["promoted"]]
    window = min(5, len(seconds) // 2)
    last_paraphrases = next((n["paraphrases"] for n in reversed(nights) if n.get("paraphrases")), None)
    paraphrase_concepts = (
        {c: v for s in last_paraphrases["suites"].values() for c, v in s["per_concept"].items()}
        if last_paraphrases
        else {}
    )
    figures = {
        "concepts": len(concepts),
        "concepts_at_or_above_95": sum(v is not None and v >= 0.95 for v in final),
        "mean_final_accuracy": sum(v or 0 for v in final) / len(final) if final else None,
        "paraphrase_accuracy": _pooled(last_paraphrases) if last_paraphrases else None,
        "paraphrases_scored_by": last_paraphrases["version"] if last_paraphrases else None,
        "concepts_at_or_above_80_on_paraphrases": sum(v >= 0.8 for v in paraphrase_concepts.values()),
        "updates": len(updates),
        "files_promoted": len({r["data"] for r in updates if r["promoted"]}),
        "files": files,
        "promoted": sum(r["promoted"] for r in updates),
        "rejected": sum(not r["promoted"] for r in updates),
        "retried": sum(len(r.get("candidates", [])) > 1 for r in updates),
        "final_base_agreement": live_rows[-1]["base_agreement"],
        "final_base_agreement_all_positions": live_rows[-1]["base_agreement_all_positions"],
        "min_live_base_agreement": min(r["base_agreement"] for r in live_rows),
        "median_update_seconds": statistics.median(seconds) if seconds else None,
        "max_update_seconds": max(seconds) if seconds else None,
        # With fewer than ten updates the two windows are shorter than five (half the updates each).
        "last_five_over_first_five": (
            statistics.mean(seconds[-window:]) / statistics.mean(seconds[:window]) if window else None
        ),
        "update_window": window,
        "paraphrase_accuracy_per_evening": {
            str(n["evening"]): _pooled(n["paraphrases"]) for n in nights if n.get("paraphrases")
        },
    }
    figures["share_of_concepts_at_95"] = figures["concepts_at_or_above_95"] / len(concepts) if concepts else None
    figures["targets"] = {name: _verdict(name, figures[name]) for name in TARGETS}
    return figures


def _summary_markdown(summary: dict, run: dict) -> str:
    lines = [
        "# Evening updates: summary",
        "",
        f"Knowledge `{run['knowledge']}`, {summary[next(iter(summary))]['files']} evenings, "
        f"epochs {run['epochs']}, arms {', '.join(summary)}.",
        "",
        "| target | " + " | ".join(summary) + " |",
        "|---|" + "---|" * len(summary),
    ]
    for name, (op, target) in TARGETS.items():
        cells = []
        for figures in summary.values():
            verdict = figures["targets"][name]
            value = verdict["value"]
            shown = "n/a" if value is None else f"{value:.3g}"
            cells.append(f"{shown} ({'met' if verdict['met'] else 'unmet'})")
        lines.append(f"| {name} {op} {target:g} | " + " | ".join(cells) + " |")
    lines += ["", "| figure | " + " | ".join(summary) + " |", "|---|" + "---|" * len(summary)]
    keys = [k for k, v in next(iter(summary.values())).items() if not isinstance(v, dict)]
    for key in keys:
        cells = [figures[key] for figures in summary.values()]
        lines.append(f"| {key} | " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, progress: Progress, knowledge: Knowledge, log=print) -> dict:
    """Every CSV, plot and the summary, from progress alone (so a finished run can be re-plotted)."""
    groups = knowledge.concept_groups()
    concepts = [c for _, members in groups for c in members]
    arms = {arm: progress.rows(arm) for arm in progress.arms}
    for arm, rows in arms.items():
        with open(out / f"retention_{arm}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["concept", "evening"] + [f"{_label(r)}_{r['version']}" for r in rows])
            evening_of = {c: e for e, members in groups for c in members}
            for concept, values in zip(concepts, _live_matrix(rows, concepts), strict=False):
                writer.writerow([concept, evening_of[concept]] + ["" if v is None else f"{v:.3f}" for v in values])
        matrix, columns = _paraphrase_matrix(progress.nights(arm), concepts)
        if columns:
            with open(out / f"paraphrases_{arm}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["concept"] + columns)
                for concept, values in zip(concepts, matrix, strict=False):
                    writer.writerow([concept] + ["" if v is None else f"{v:.3f}" for v in values])
        with open(out / f"updates_{arm}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                [
                    "evening",
                    "data",
                    "version",
                    "promoted",
                    "seconds",
                    "base_agreement",
                    "base_agreement_all_positions",
                    "perplexity_change",
                    "reasons",
                    "candidates",
                ]
            )
            for r in rows:
                writer.writerow(
                    [
                        r["evening"],
                        r.get("data", "foundation"),
                        r["version"],
                        r["promoted"],
                        f"{r['seconds']:.1f}",
                        f"{r['base_agreement']:.4f}",
                        f"{r['base_agreement_all_positions']:.4f}",
                        f"{r['perplexity_change']:.4f}",
                        "; ".join(r["reasons"]),
                        " | ".join(r.get("candidates", [])),
                    ]
                )
    _heatmap(
        {
            arm: (_live_matrix(rows, concepts), [_label(r) + ("" if r["promoted"] else "*") for r in rows])
            for arm, rows in arms.items()
        },
        groups,
        "training questions, accuracy of the live version (%)",
        out / "retention.png",
    )
    written = ["retention_*.csv", "updates_*.csv", "retention.png"]
    paraphrase_panels = {arm: _paraphrase_matrix(progress.nights(arm), concepts) for arm in arms}
    if any(columns for _, columns in paraphrase_panels.values()):
        _heatmap(
            paraphrase_panels,
            groups,
            "held-out paraphrases, accuracy of the live version (%)",
            out / "paraphrases.png",
            note="columns: evening_live version",
        )
        written += ["paraphrases_*.csv", "paraphrases.png"]
    evenings = len(knowledge.evenings)
    _line_plot(
        {arm: _update_points(rows[1:]) for arm, rows in arms.items()},
        "seconds",
        "time per update (training, evaluation, retries)",
        out / "update_seconds.png",
        evenings,
        lines=((TARGETS["median_update_seconds"][1], "median target"), (TARGETS["max_update_seconds"][1], "max")),
    )
    accuracy: dict[str, list[tuple[float, float | None]]] = {}
    for arm in arms:
        taught: list[str] = []
        train_points: list[tuple[float, float | None]] = []
        paraphrase_points: list[tuple[float, float | None]] = []
        live: dict = {}
        nights = {n["evening"]: n for n in progress.nights(arm)}
        for evening, members in groups:
            if evening not in nights:
                break
            taught += members
            for r in arms[arm]:
                if r["evening"] == evening and r["promoted"]:
                    live = r["concepts"]
            train_points.append((evening, sum(live.get(c) or 0 for c in taught) / len(taught)))
            paraphrase_points.append((evening, _pooled(nights[evening].get("paraphrases") or {})))
        accuracy[f"{arm}: training questions"] = train_points
        if any(y is not None for _, y in paraphrase_points):
            accuracy[f"{arm}: paraphrases"] = paraphrase_points
    _line_plot(
        accuracy,
        "share right, concepts taught so far",
        "accuracy of the live version after each evening",
        out / "accuracy.png",
        evenings,
        lines=((0.95, "95%"), (0.8, "80%")),
    )
    written += ["update_seconds.png", "accuracy.png"]
    summary = {
        arm: summarise(rows, progress.nights(arm), concepts, len(knowledge.evenings)) for arm, rows in arms.items()
    }
    from core.atomic import write_json

    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(_summary_markdown(summary, progress.run), encoding="utf-8")
    for arm, figures in summary.items():
        log(
            f"{arm}: "
            + ", ".join(
                f"{name} {'n/a' if v['value'] is None else format(v['value'], '.3g')} {'met' if v['met'] else 'UNMET'}"
                for name, v in figures["targets"].items()
            )
        )
    log(f"wrote {out}/{', '.join(written)}, summary.json, summary.md")
    return summary


def _print_row(row: dict) -> None:
    worst = min(row["concepts"].values()) if row["concepts"] else float("nan")
    print(
        f"evening {row['evening']:2d} {row['arm']:8} {row['data'][:12]:12} {row['version']:>4} "
        f"{'live' if row['promoted'] else 'REJECTED':8} {row['seconds']:5.0f} s  worst concept "
        f"{worst:4.0%}  base agreement {row['base_agreement']:.1%} "
        f"({row['base_agreement_all_positions']:.1%} all)  ppl {row['perplexity_change']:+.1%}"
        + ("" if row["promoted"] else f"  ({'; '.join(row['reasons'])[:160]})"),
        flush=True,
    )
    for candidate in row["candidates"][:-1]:
        print(f"           first candidate {candidate[:200]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--knowledge", default=str(EVENINGS), help="the knowledge set (default examples/evenings)")
    parser.add_argument("--evenings", type=int, help="how many of its evenings (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "evenings"))
    parser.add_argument("--arms", default="scalpel,naive", help="which arms to run (comma-separated)")
    parser.add_argument(
        "--epochs",
        type=float,
        default=8.0,
        help="num_epochs for the foundation and every update (default 8; at 6, a foundation concept was half learned)",
    )
    parser.add_argument(
        "--learning-rate", type=float, help="the foundation's learning rate (default: examples/demo_config.json's 3e-3)"
    )
    parser.add_argument(
        "--update-learning-rate",
        type=float,
        help="every update's learning rate (default: as shipped, a third of the foundation's)",
    )
    parser.add_argument("--update-epochs", type=float, help="every update's num_epochs (default: --epochs)")
    parser.add_argument("--new-repeats", type=int, help="the scalpel arm's new_repeats (default: as shipped)")
    parser.add_argument("--polish-epochs", type=float, help="the scalpel arm's polish_epochs (default: as shipped)")
    parser.add_argument("--repair-epochs", type=float, help="the scalpel arm's repair_epochs (default: as shipped)")
    parser.add_argument("--repair-rounds", type=int, help="the scalpel arm's repair_rounds (default: as shipped)")
    parser.add_argument("--paraphrases", type=int, help="the scalpel arm's paraphrases (default: as shipped)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=TARGETS["max_update_seconds"][1],
        help="the scalpel arm's max_update_seconds: no retry starts that would end later (default: the target, 450)",
    )
    parser.add_argument("--replay-budget", type=int, help="the scalpel arm's replay_budget (default: as shipped)")
    parser.add_argument("--preservation-ratio", type=float, default=0.5, help="the scalpel arm's preservation ratio")
    parser.add_argument(
        "--preservation-loss",
        choices=["distill", "answers"],
        default="distill",
        help="how the foundation and the scalpel arm learn the base-preservation examples",
    )
    parser.add_argument("--preservation-weight", type=float, default=4.0, help="weight of the distillation term")
    parser.add_argument("--candidates", type=int, help="the scalpel arm's max_candidates (default: as shipped)")
    parser.add_argument(
        "--paraphrase-every",
        type=int,
        default=1,
        help="score the held-out paraphrases after every Nth evening (and always after the last)",
    )
    parser.add_argument("--fresh", action="store_true", help="start over, even where a run can be resumed")
    args = parser.parse_args()
    if args.paraphrase_every < 1:
        parser.error("--paraphrase-every must be at least 1")
    knowledge = Knowledge.read(Path(args.knowledge), args.evenings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    home = out / "home"
    os.environ["SCALPEL_HOME"] = str(home)
    from scalpel.update import UpdateSettings, run_inbox

    arm_names = args.arms.split(",")
    run = {
        "knowledge": str(knowledge.root.resolve()),
        "files_sha256": knowledge.hashes(),
        "arms": arm_names,
        **{
            k: getattr(args, k)
            for k in (
                "epochs",
                "learning_rate",
                "update_learning_rate",
                "update_epochs",
                "new_repeats",
                "polish_epochs",
                "repair_epochs",
                "repair_rounds",
                "paraphrases",
                "max_seconds",
                "replay_budget",
                "preservation_ratio",
                "preservation_loss",
                "preservation_weight",
                "candidates",
            )
        },
    }
    progress = Progress.open(out, run, args.fresh)
    started = time.time()
    if not all(progress.rows(arm) for arm in arm_names):
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        foundation = _foundation(
            home, knowledge, args.epochs, args.learning_rate, args.preservation_loss, args.preservation_weight
        )
        print(
            f"foundation v1 in {time.time() - started:.0f} s: {foundation['concepts']}, base agreement "
            f"{foundation['base_agreement']:.1%} ({foundation['base_agreement_all_positions']:.1%} of all picks), "
            f"ppl {foundation['perplexity_change']:+.1%}",
            flush=True,
        )
        progress.arms = {}
        paraphrases = _paraphrase_night(arm_names[0], knowledge, 0, None)  # every arm's v1 is the same adapter
        for arm in arm_names:
            progress.record(arm, [{**foundation, "arm": arm}], _end_night(home, arm, 0, paraphrases))
    else:
        print(
            f"resuming {out}: "
            + ", ".join(f"{arm} done to evening {progress.nights(arm)[-1]['evening']}" for arm in arm_names),
            flush=True,
        )
    recipe = {"num_epochs": args.update_epochs or args.epochs, "learning_rate": args.update_learning_rate}
    settings = {
        "scalpel": UpdateSettings(
            **recipe,
            preservation_ratio=args.preservation_ratio,
            preservation_loss=args.preservation_loss,
            preservation_weight=args.preservation_weight,
            max_update_seconds=args.max_seconds,
            **({"max_candidates": args.candidates} if args.candidates else {}),
            **({"replay_budget": args.replay_budget} if args.replay_budget is not None else {}),
            **({"new_repeats": args.new_repeats} if args.new_repeats else {}),
            **({"polish_epochs": args.polish_epochs} if args.polish_epochs is not None else {}),
            **({"repair_epochs": args.repair_epochs} if args.repair_epochs is not None else {}),
            **({"repair_rounds": args.repair_rounds} if args.repair_rounds is not None else {}),
            **({"paraphrases": args.paraphrases} if args.paraphrases is not None else {}),
        ),
        "naive": UpdateSettings(**recipe, gates=False, replay_ratio=0, replay_per_concept=0, preservation_ratio=0),
    }
    settings = {arm: value for arm, value in settings.items() if arm in arm_names}
    suites = {knowledge.suite(data).stem for data in knowledge.files}
    # Each evening's file is dropped into the arm's inbox and the inbox is processed, as the cron line in the
    # README does: a file that was not promoted stays there and is tried again the next evening, first.
    dropped_on = {f.stem: evening for evening, f in enumerate(knowledge.files)}
    last = len(knowledge.evenings)
    for evening, data in enumerate(knowledge.evenings, 1):
        for arm, arm_settings in settings.items():
            if progress.done(arm, evening):
                continue
            _restore(home, arm, progress.nights(arm)[-1])
            inbox = home / f"inbox_{arm}"
            for f in (data, knowledge.suite(data)):
                shutil.copyfile(f, inbox / f.name)  # not the paraphrases: the update never sees them
            rows = []
            for result in run_inbox(_adapter(arm), inbox, settings=arm_settings, progress=False, log=lambda *_: None):
                rows.append(_row(arm, evening, dropped_on, suites, result))
                _print_row(rows[-1])
            earlier = next((n["paraphrases"] for n in reversed(progress.nights(arm)) if n.get("paraphrases")), None)
            score = evening == last or evening % args.paraphrase_every == 0
            paraphrases = _paraphrase_night(arm, knowledge, evening, earlier) if score else {}
            if paraphrases:
                print(f"evening {evening:2d} {arm:8} paraphrases {_pooled(paraphrases):.0%}", flush=True)
            progress.record(arm, rows, _end_night(home, arm, evening, paraphrases))
    write_results(out, progress, knowledge)
    print(f"{time.time() - started:.0f} s in all")


if __name__ == "__main__":
    main()

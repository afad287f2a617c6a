"""Benchmark: ten evenings of updates on the default model, starting from one foundation adapter.

Two arms, in the same run, from the same foundation version:
  scalpel  `scalpel update` as shipped: replay of earlier data, base-preservation examples, gates on;
  naive    plain sequential retraining: new data only, no replay, no preservation, always promoted.
Each evening's knowledge file is dropped into the arm's inbox and the inbox is processed (`scalpel update
--inbox`), so a file that was not promoted is tried again first on the next evening (up to 3 evenings).
After every update, every suite so far is scored through llama.cpp (greedy), plus base regression.
Writes, per arm, the retention matrix (concept x version) as CSV and both arms as one heatmap PNG, the
base-regression figures and wall time per update, and a summary JSON.

    .venv/bin/python bench/evenings.py [--evenings 10] [--out bench/results/evenings] [--arms scalpel,naive]
                                       [--epochs 8] [--learning-rate LR] [--update-learning-rate LR]
                                       [--preservation-ratio R]
                                       [--preservation-loss distill|answers] [--preservation-weight W]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EVENINGS = ROOT / "examples" / "evenings"


def _foundation(
    home: Path,
    epochs: float | None = None,
    learning_rate: float | None = None,
    preservation_loss: str = "distill",
    preservation_weight: float = 4.0,
) -> dict:
    """The foundation adapter (with base-preservation examples, as every update has), evaluated as evening 0."""
    import random

    from core import model_store
    from scalpel import evaluate
    from scalpel.publish import train_and_publish
    from scalpel.update import PRESERVATION_CONCEPT, preservation_examples
    from serving.engine import Engine
    from training.config import load_config

    base = model_store.ensure_default()
    config = load_config(ROOT / "examples" / "demo_config.json").model_copy(
        update={"output_dir": "./adapters/evenings_scalpel"}
    )
    overrides = {k: v for k, v in (("num_epochs", epochs), ("learning_rate", learning_rate)) if v is not None}
    if preservation_loss == "distill":
        overrides.update(distill_concepts=[PRESERVATION_CONCEPT], distill_weight=preservation_weight)
    config = config.model_copy(update={"training_config": config.training_config.model_copy(update=overrides)})
    knowledge = json.loads((EVENINGS / "foundation.json").read_text(encoding="utf-8"))
    engine = Engine(base)
    try:
        preserve = random.Random(0).sample(preservation_examples(engine), len(knowledge) // 2)
        mixed = home / "foundation_mixed.json"
        mixed.write_text(json.dumps(knowledge + preserve, ensure_ascii=False), encoding="utf-8")
        result = train_and_publish(
            config,
            mixed,
            model=base.name,
            progress=False,
            keep_files={"data/train.json": EVENINGS / "foundation.json"},
            eval_suites=(EVENINGS / "foundation.eval.json",),
        )
        suite = {"foundation.eval": evaluate.load_suite(EVENINGS / "foundation.eval.json")}
        report = evaluate.evaluate(engine, ((engine.load(result.version), 1.0),), suite, result.version.ref)
    finally:
        engine.close()
    # The naive arm starts from a byte-identical copy of the same foundation version.
    shutil.copytree(result.version.path.parent, home / "adapters" / "evenings_naive")
    return {
        "evening": 0,
        "version": "v1",
        "promoted": True,
        "reasons": [],
        "seconds": result.train_seconds,
        "concepts": report.suites[0].per_concept,
        "base_agreement": report.base.agreement,
        "base_agreement_all_positions": report.base.agreement_all_positions,
        "perplexity_change": report.base.perplexity_change,
    }


def _row(arm: str, evening: int, dropped_on: dict[str, int], result) -> dict:
    """One update's figures; `dropped_on` maps a knowledge file's stem to the evening it entered the inbox."""
    data = Path(result.version.manifest.update.new_data).stem
    ev = result.eval
    base = ev.get("base_regression") or {}
    concepts = {}
    for suite in ev["suites"].values():
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


def _heatmap(arms: dict[str, list[dict]], concepts: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(arms), figsize=(6 * len(arms), 0.45 * len(concepts) + 2), squeeze=False)
    for ax, (arm, rows) in zip(axes[0], arms.items(), strict=False):
        grid = np.array([[np.nan if v is None else v * 100 for v in row] for row in _live_matrix(rows, concepts)])
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        labels = [_label(r) + ("" if r["promoted"] else "*") for r in rows]
        ax.set_xticks(range(len(rows)), labels, rotation=90 if len(rows) > 14 or max(map(len, labels)) > 4 else 0)
        ax.set_yticks(range(len(concepts)), concepts, fontsize=8)
        ax.set_title(f"{arm}: accuracy of the live version (%)\n(* = update rejected, previous version live)")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
    fig.subplots_adjust(wspace=0.7)  # room for the second panel's concept labels
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evenings", type=int, default=10)
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
    parser.add_argument("--preservation-ratio", type=float, default=0.5, help="the scalpel arm's preservation ratio")
    parser.add_argument(
        "--preservation-loss",
        choices=["distill", "answers"],
        default="distill",
        help="how the foundation and the scalpel arm learn the base-preservation examples",
    )
    parser.add_argument("--preservation-weight", type=float, default=4.0, help="weight of the distillation term")
    args = parser.parse_args()
    out = Path(args.out)
    home = out / "home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    os.environ["SCALPEL_HOME"] = str(home)
    from scalpel.update import UpdateSettings, run_inbox

    started = time.time()
    foundation = _foundation(home, args.epochs, args.learning_rate, args.preservation_loss, args.preservation_weight)
    print(
        f"foundation v1 in {time.time() - started:.0f} s: {foundation['concepts']}, base agreement "
        f"{foundation['base_agreement']:.1%} ({foundation['base_agreement_all_positions']:.1%} of all picks), "
        f"ppl {foundation['perplexity_change']:+.1%}",
        flush=True,
    )
    recipe = {"num_epochs": args.epochs, "learning_rate": args.update_learning_rate}
    settings = {
        "scalpel": UpdateSettings(
            **recipe,
            preservation_ratio=args.preservation_ratio,
            preservation_loss=args.preservation_loss,
            preservation_weight=args.preservation_weight,
        ),
        "naive": UpdateSettings(**recipe, gates=False, replay_ratio=0, replay_per_concept=0, preservation_ratio=0),
    }
    settings = {arm: value for arm, value in settings.items() if arm in args.arms.split(",")}
    arms: dict[str, list[dict]] = {arm: [{**foundation, "arm": arm}] for arm in settings}
    files = sorted(f for f in EVENINGS.glob("evening*.json") if not f.name.endswith(".eval.json"))[: args.evenings]
    # Each evening's file is dropped into the arm's inbox and the inbox is processed, as the cron line in the
    # README does: a file that was not promoted stays there and is tried again the next evening, first.
    dropped_on = {f.stem: evening for evening, f in enumerate(files, 1)}
    for evening, data in enumerate(files, 1):
        for arm, arm_settings in settings.items():
            inbox = home / f"inbox_{arm}"
            inbox.mkdir(exist_ok=True)
            for f in (data, data.with_name(f"{data.stem}.eval.json")):
                shutil.copyfile(f, inbox / f.name)
            for result in run_inbox(
                f"evenings_{arm}", inbox, settings=arm_settings, progress=False, log=lambda *_: None
            ):
                row = _row(arm, evening, dropped_on, result)
                arms[arm].append(row)
                worst = min(row["concepts"].values())
                print(
                    f"evening {evening:2d} {arm:8} {row['data'][:9]:9} {row['version']:>4} "
                    f"{'live' if row['promoted'] else 'REJECTED':8} {row['seconds']:5.0f} s  worst concept "
                    f"{worst:4.0%}  base agreement {row['base_agreement']:.1%} "
                    f"({row['base_agreement_all_positions']:.1%} all)  ppl {row['perplexity_change']:+.1%}"
                    + ("" if row["promoted"] else f"  ({'; '.join(row['reasons'])[:160]})"),
                    flush=True,
                )
                for candidate in row["candidates"][:-1]:
                    print(f"           first candidate {candidate[:200]}", flush=True)
        (out / "rows.json").write_text(json.dumps(arms, indent=1))

    concepts = list(dict.fromkeys(c for rows in arms.values() for r in rows for c in r["concepts"]))
    for arm, rows in arms.items():
        with open(out / f"retention_{arm}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["concept"] + [f"{_label(r)}_{r['version']}" for r in rows])
            for concept, values in zip(concepts, _live_matrix(rows, concepts), strict=False):
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
    _heatmap(arms, concepts, out / "retention.png")
    summary = {}
    for arm, rows in arms.items():
        final = [values[-1] for values in _live_matrix(rows, concepts)]
        updates = rows[1:]  # rows[0] is the foundation
        live_rows = [r for r in rows if r["promoted"]]
        summary[arm] = {
            "concepts_at_or_above_95": sum(v is not None and v >= 0.95 for v in final),
            "concepts": len(concepts),
            "mean_final_accuracy": sum(v or 0 for v in final) / len(final),
            "updates": len(updates),
            "files_promoted": len({r["data"] for r in updates if r["promoted"]}),
            "files": len(files),
            "promoted": sum(r["promoted"] for r in updates),
            "rejected": sum(not r["promoted"] for r in updates),
            "retried": sum(len(r.get("candidates", [])) > 1 for r in updates),
            "final_base_agreement": live_rows[-1]["base_agreement"],
            "final_base_agreement_all_positions": live_rows[-1]["base_agreement_all_positions"],
            "min_live_base_agreement": min(r["base_agreement"] for r in live_rows),
            "max_update_seconds": max((r["seconds"] for r in updates), default=0.0),
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(
        f"wrote {out}/retention_*.csv, updates_*.csv, retention.png, summary.json "
        f"({time.time() - started:.0f} s in all)"
    )


if __name__ == "__main__":
    main()

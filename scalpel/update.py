"""The evening update: continue the live adapter on new knowledge, replay and base preservation, then gate.

1. Train from the live version's weights on the new examples, plus a seeded sample of every earlier
   version's data (replay), plus the base model's own answers to general prompts (base preservation,
   generated once per base and cached), so new knowledge does not overwrite old knowledge or the base's
   skills.
2. Evaluate the staged version through llama.cpp: the new suite (without one, a suite derived from the new
   data, kept for later updates), every earlier version's suites (retention), the general questions and base
   regression, judged against the bare base itself.
3. Publish it as the next version either way (versions are never lost), but make it live only if every
   gate passes; otherwise the current version stays live and the manifest says why.
4. When a candidate fails and the time allows, train one more from the live version, leaning on what failed:
   the forgotten concepts replayed in full, the under-learned new examples repeated, or more preservation.
   With repair_epochs, a candidate that failed on knowledge alone (new concepts answered wrong, earlier answers
   lost; the base intact) is first trained a little further on those concepts and judged again
   (EveningUpdate.repair).
5. Unattended (run_inbox), a knowledge file that was not promoted stays in the inbox and is tried again on
   the next evening, a few times, before it is set aside.

EveningUpdate does one update (run_update) phase by phase, each candidate through plan_mix -> train (into a
staging folder) -> evaluate -> decide -> [repair -> evaluate -> decide] -> publish; whether a candidate goes live
is decided by decide and done by publish, nowhere else. The module's functions are its pure parts: the replay
sample, the mix, the gates.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from core import adapter_store, model_store, paths
from core.atomic import read_json, sha256_file, write_json
from core.errors import ConflictError, ScalpelError
from core.manifest import DatasetRef
from scalpel import evaluate, paraphrase, preservation
from scalpel.evaluate import EvalItem, EvalReport
from scalpel.paraphrase import ParaphraseSettings
from scalpel.preservation import PRESERVATION_CONCEPT
from scalpel.preservation import preservation_examples as preservation_examples  # re-exported: bench/evenings.py
from scalpel.publish import StagedVersion, TrainingData, publish_staged, stage_version
from scalpel.replay_budget import budget_replay
from scalpel.retention_check import SuiteChecker
from scalpel.update_settings import INBOX_ATTEMPTS, UpdateSettings
from serving.engine_process import EngineProcess
from training.config import TrainConfig, parse_config
from training.dataset import Example, examples_hash, load_examples
from training.quality import QualityReport, check


@dataclass(frozen=True)
class Emphasis:
    """What a retry leans on, from how the candidate before it failed."""

    new_repeats: int = 1  # each new example this many times: it was under-learned
    replay_in_full: tuple[str, ...] = ()  # earlier concepts replayed with every example: forgotten
    preservation_scale: float = 1.0  # more base-preservation examples: the base drifted


@dataclass
class UpdateResult:
    version: adapter_store.AdapterVersion
    promoted: bool
    reasons: list[str]  # why it was not promoted (empty when it was)
    eval: dict
    seconds: float
    candidates: list[dict] = field(default_factory=list)  # every candidate trained: version, outcome, emphasis


@contextlib.contextmanager
def update_lock(name: str) -> Iterator[None]:
    """One update per adapter at a time, across processes; the lock dies with its process."""
    folder = paths.state_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"update-{paths.check_name(name, 'adapter')}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.seek(0)
            raise ConflictError(
                f"another update of {name!r} is running ({handle.read().strip()})", param="name", code="update_running"
            ) from exc
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
        handle.flush()
        yield


def lineage(version: adapter_store.AdapterVersion) -> list[adapter_store.AdapterVersion]:
    """This version and its ancestors (parent_version links), newest first."""
    chain, seen = [version], {version.version}
    while (parent := chain[-1].manifest.parent_version) and parent not in seen:
        seen.add(parent)
        chain.append(adapter_store.resolve(f"{version.name}@{parent}"))
    return chain


def _version_examples(version: adapter_store.AdapterVersion) -> list[Example]:
    """The new data a version was trained on (kept in its data/ folder; replayed examples are not in it)."""
    examples = []
    for f in sorted(version.path.glob("data/train*")):
        examples += [e for e in load_examples(f) if e.concept != PRESERVATION_CONCEPT]
    return examples


def replay_sample(earlier: list[Example], count: int, per_concept: int, rng: random.Random) -> list[Example]:
    """A replay sample spread evenly over the earlier concepts: each gets at least `per_concept` examples
    (all it has, if fewer), and the whole sample at least `count`, taken round-robin across concepts.

    A uniform sample would give a concept taught once, long ago, a share that shrinks every evening, and
    that concept is the one that gets forgotten.
    """
    by_concept: dict[str, list[Example]] = {}
    for example in earlier:
        by_concept.setdefault(example.concept, []).append(example)
    for pool in by_concept.values():
        rng.shuffle(pool)
    total = min(len(earlier), max(count, sum(min(per_concept, len(p)) for p in by_concept.values())))
    sample: list[Example] = []
    depth = 0
    while len(sample) < total:
        sample += [pool[depth] for pool in by_concept.values() if depth < len(pool)][: total - len(sample)]
        depth += 1
    return sample


def retention(report: evaluate.EvalReport, live_eval: dict) -> dict[str, float]:
    """Per earlier suite: of the questions the live version answered right, the share the new one still does."""
    out = {}
    for suite in report.suites:
        before = (live_eval.get("suites") or {}).get(suite.name)
        if before is None:
            continue
        knew = {a["question"] for a in before["answers"] if a["passed"]}
        still = {a["question"] for a in suite.answers if a["passed"]}
        out[suite.name] = len(knew & still) / len(knew) if knew else 1.0
    return out


@dataclass
class GateFailures:
    """Which gates a candidate failed: gate_decision puts them in words, retry_emphasis leans on them."""

    retention: dict[str, float]  # earlier suite -> share of the live version's answers kept
    under_learned: list[evaluate.SuiteResult]  # the new suite, when below min_new_knowledge
    forgotten: dict[str, float]  # the earlier suites below min_retention
    base: list[str]  # base-regression reasons (base_gate)
    # Per earlier suite, the concepts of the questions the live version answered right and the candidate does not
    # (below min_retention or not): what a repair retrains.
    lost: dict[str, set[str]] = field(default_factory=dict)


def lost_concepts(report: evaluate.EvalReport, live_eval: dict) -> dict[str, set[str]]:
    """Per earlier suite, the concepts of the questions the live version answered right and this report's version
    does not (suites that lost nothing are left out)."""
    lost = {}
    for suite in report.suites:
        before = (live_eval.get("suites") or {}).get(suite.name)
        if before is None:
            continue
        knew = {a["question"] for a in before["answers"] if a["passed"]}
        concepts = {a["concept"] for a in suite.answers if a["question"] in knew and not a["passed"]}
        if concepts:
            lost[suite.name] = concepts
    return lost


def failed_gates(
    report: evaluate.EvalReport, new_suite: str | None, settings: UpdateSettings, live_eval: dict
) -> GateFailures:
    """New knowledge is judged absolutely. Retention is relative to the live version: what it knew must
    still be known. Base regression is judged against the bare base (base_gate)."""
    kept = retention(report, live_eval)
    if not settings.gates:
        return GateFailures(kept, [], {}, [])
    return GateFailures(
        kept,
        [s for s in report.suites if s.name == new_suite and s.accuracy < settings.min_new_knowledge],
        {name: share for name, share in kept.items() if share < settings.min_retention},
        base_gate(report.base, settings, live_eval.get("base_regression") or {}),
        lost_concepts(report, live_eval),
    )


def gate_decision(failed: GateFailures, settings: UpdateSettings) -> list[str]:
    """Every gate that failed, in words; an empty list means promote."""
    reasons = []
    for suite in failed.under_learned:
        concepts = ", ".join(sorted(_wrong(suite)))
        reasons.append(
            f"new knowledge {suite.name}: {_below(suite.accuracy, settings.min_new_knowledge)} < "
            f"{settings.min_new_knowledge:.0%} (failed: {concepts})"
        )
    for name, kept in failed.forgotten.items():
        reasons.append(
            f"retention {name}: {_below(kept, settings.min_retention)} of what the live version knew < "
            f"{settings.min_retention:.0%}"
        )
    return reasons + failed.base


def _wrong(suite: evaluate.SuiteResult) -> set[str]:
    """The concepts of the questions a suite's answers got wrong."""
    return {a["concept"] for a in suite.answers if not a["passed"]}


def _below(share: float, floor: float) -> str:
    """A share under its floor, in whole percent unless that would round it up to the floor: then cut, not
    rounded, to a tenth (18 of 19 right is 94.7%, not "95% < 95%")."""
    shown = f"{share:.0%}"
    return f"{math.floor(share * 1000 + 1e-9) / 10:.1f}%" if shown == f"{floor:.0%}" else shown


def base_gate(base: evaluate.BaseRegression | None, settings: UpdateSettings, live_base: dict) -> list[str]:
    """The base-regression part of failed_gates, against the bare base's own targets: at least
    min_base_agreement of its decided picks, and perplexity on general text at most max_perplexity_increase
    above its own, whatever the live version reaches; a live version already below them does not lower them.

    Only with relative_base_gate (asked for explicitly) does a live version below a target lower it to its own
    level, less base_tolerance: an adapter that already lost the base's skills may then lose a little more.
    """
    if base is None:
        return []
    reasons = []
    live_agreement = live_base.get("agreement", 1.0)
    live_change = live_base.get("perplexity_change", -1.0)
    floor, ceiling = settings.min_base_agreement, settings.max_perplexity_increase
    if settings.relative_base_gate and live_agreement < floor:
        floor = live_agreement - settings.base_tolerance
    if settings.relative_base_gate and live_change > ceiling:
        ceiling = live_change + settings.base_tolerance
    if base.agreement < floor:
        below = not settings.relative_base_gate and live_agreement < settings.min_base_agreement
        reasons.append(
            f"base agreement {base.agreement:.1%} < {floor:.1%}"
            + (f" (the live version has {live_agreement:.1%}: judged against the base, not it)" if below else "")
        )
    if base.perplexity_change > ceiling:
        above = not settings.relative_base_gate and live_change > settings.max_perplexity_increase
        reasons.append(
            f"perplexity on general text {base.perplexity_change:+.1%} > +{ceiling:.1%}"
            + (f" (the live version has {live_change:+.1%}: judged against the base, not it)" if above else "")
        )
    return reasons


def shortfall(verdict: Verdict) -> tuple[int, float]:
    """How far a candidate falls short, to compare two: the gates it failed, then the share of the new suite's
    questions missed under its gate and of each earlier suite's answers lost."""
    failed = verdict.failed
    missed = sum(1 - s.accuracy for s in failed.under_learned) + sum(1 - kept for kept in failed.retention.values())
    return len(verdict.reasons), missed


def recently_repaired(earlier_rounds: list[dict], wrong: list[str], lost: list[str]) -> tuple[list[str], list[str]]:
    """The new and the earlier concepts an earlier repair round retrained that are right now: a round trains them
    again beside what it aims at. On the 100-concept benchmark, a second round aimed at one concept alone lost
    a project the first round had just repaired, and the candidate was rejected for it."""
    new = sorted({c for r in earlier_rounds for c in r.get("concepts", [])} - set(wrong))
    earlier = sorted({c for r in earlier_rounds for c in r.get("forgotten", [])} - set(lost))
    return new, earlier


def retry_emphasis(failed: GateFailures, report: evaluate.EvalReport, before: Emphasis) -> Emphasis:
    """What the next candidate leans on, given how this one failed its gates.

    Under-learned new knowledge: every new example once more. A forgotten earlier answer: every concept
    of its suite replayed with all its examples, not a sample (in the ten-evening benchmark, a retry that
    replayed only the forgotten concept in full lost a sibling concept of the same suite instead).
    Base drift: twice the preservation examples.
    """
    in_full = set(before.replay_in_full)
    for suite in report.suites:
        if suite.name in failed.forgotten:
            in_full |= {a["concept"] for a in suite.answers}
    return Emphasis(
        before.new_repeats + bool(failed.under_learned),
        tuple(sorted(in_full)),
        before.preservation_scale * (2 if failed.base else 1),
    )


def carried_concepts(live: adapter_store.AdapterVersion, earlier: list[Example]) -> set[str]:
    """Every still-taught concept that the live version's own update replayed in full, or that a candidate
    rejected since (trained from the live version) forgot: fragile, and so emphasised by the next update."""
    live_update = live.manifest.update
    kept = set(live_update.emphasis.replay_in_full if live_update else [])
    made = adapter_store.versions(live.path.parent)  # oldest first
    for version in made[made.index(live.version) + 1 :]:
        manifest = adapter_store.AdapterVersion(live.name, version, live.path.parent / version).manifest
        if manifest.update is not None and manifest.update.from_ == live.ref:
            kept |= set((manifest.eval or {}).get("lean_next", {}).get("replay_in_full", []))
    return kept & {e.concept for e in earlier}


def first_emphasis(live: adapter_store.AdapterVersion, earlier: list[Example], settings: UpdateSettings) -> Emphasis:
    """The first candidate's emphasis: the new examples `new_repeats` times and, when keep_full_replay, the
    carried concepts replayed in full. In the
    ten-evening benchmark, the foundation concept that the first candidates forgot on evenings 1, 2 and 3 was
    forgotten again each time it was only sampled, and git_workflow on evenings 8 and 9.

    Under a replay budget a full replay of them would grow without bound: plan_mix counts them as at risk
    instead (replay_per_risky examples each)."""
    if not settings.keep_full_replay or settings.replay_budget is not None:
        return Emphasis(new_repeats=settings.new_repeats)
    return Emphasis(settings.new_repeats, tuple(sorted(carried_concepts(live, earlier))))


def replay_risk(live_eval: dict, suites: dict[str, list[EvalItem]], earlier: list[Example]) -> dict[str, float]:
    """Each earlier concept's risk for budget_replay: the thinnest margin by which the live version kept its
    answers (its manifest's "risk"); 0 where they had to be generated or were never checked that way (the live
    version's own new knowledge), and infinity for a concept no suite asks about, which only the rotation replays."""
    recorded = live_eval.get("risk") or {}
    risk = {e.concept: float("inf") for e in earlier}
    for items in suites.values():
        for item in items:
            if item.concept in risk:
                margin = recorded.get(item.concept, 0.0)
                risk[item.concept] = float("inf") if margin is None else margin
    return risk


def training_mix(
    new: list[Example],
    earlier: list[Example],
    pool: list[Example],
    settings: UpdateSettings,
    emphasis: Emphasis,
    rng: random.Random,
    risk: dict[str, float] | None = None,
    rewrites: dict[str, list[str]] | None = None,
) -> tuple[list[Example], list[Example], list[Example]]:
    """One candidate's training data: (the new examples, repeated as emphasised; the replay; the preservation).
    With `rewrites` (answer -> paraphrased questions), the repeats are asked in other words, at least two.

    Under a replay budget, as many examples as replay_sample would take, but at most the budget, spent by
    budget_replay on the concepts at risk (`risk`, from replay_risk) first.
    """
    count = round(settings.replay_ratio * len(new))
    if settings.replay_budget is None:
        replay = replay_sample(earlier, count, settings.replay_per_concept, rng)
    else:
        concepts = len({e.concept for e in earlier})
        wanted = min(len(earlier), max(count, settings.replay_per_concept * concepts), settings.replay_budget)
        replay = budget_replay(
            earlier,
            wanted,
            risk or {},
            risk_margin=settings.risk_margin,
            per_risky=settings.replay_per_risky,
            rng=rng,
            new=new,
        )
    sampled = {id(e) for e in replay}
    in_full = [e for e in earlier if e.concept in emphasis.replay_in_full and id(e) not in sampled]
    if settings.replay_budget is not None and len(in_full) > settings.replay_budget:
        # A retry replays a forgotten suite's concepts in full; under a budget, at most the budget more of them.
        rng.shuffle(in_full)
        in_full = in_full[: settings.replay_budget]
    replay += in_full
    preserve = preservation.sample(pool, len(new), settings.preservation(), rng, emphasis.preservation_scale)
    if rewrites and any(rewrites.values()):
        return paraphrase.repeats_in_other_words(new, max(emphasis.new_repeats, 2), rewrites), replay, preserve
    return new * emphasis.new_repeats, replay, preserve


def _update_config(
    name: str, live: adapter_store.AdapterVersion, first: adapter_store.AdapterVersion, settings: UpdateSettings
):
    """The live version's config, with the update's training overrides and the adapter's own folder."""
    config = live.manifest.config
    first_rate = first.manifest.config["training_config"]["learning_rate"]
    overrides = {"learning_rate": settings.learning_rate or first_rate * settings.learning_rate_scale}
    if settings.num_epochs is not None:
        overrides["num_epochs"] = settings.num_epochs
    overrides.update(preservation.training_overrides(settings.preservation()))
    # The new version goes beside the live one, whatever output_dir the first version was trained with.
    return parse_config(
        {
            **config,
            "output_dir": str(adapter_store.root_for_name(name)),
            "training_config": {**config["training_config"], **overrides},
        }
    )


@dataclass
class Mix:
    """One candidate's training data (plan_mix): drawn by training_mix, then put in one seeded order."""

    emphasis: Emphasis  # what it leans on
    new: list[Example]  # the new examples, each repeated as emphasised
    replay: list[Example]
    preservation: list[Example]
    examples: list[Example]  # all of the above, shuffled: what training sees


@dataclass
class Verdict:
    """What the gates made of a staged candidate (decide)."""

    reasons: list[str]  # every gate it failed, in words; none: it is promoted
    lean_next: Emphasis  # what a retry after it leans on
    outcome: dict  # its manifest's "eval": the scores, the retention, the decision and why
    failed: GateFailures  # which gates it failed: a repair aims at the under-learned and the lost concepts

    @property
    def promoted(self) -> bool:
        """Whether the candidate passed every gate (and so goes live)."""
        return not self.reasons


@dataclass
class Candidate:
    """A candidate trained, judged and published (as the live version, or kept as a record)."""

    version: adapter_store.AdapterVersion
    mix: Mix
    verdict: Verdict
    seconds: float  # training, conversion, evaluation, any repair, and publishing
    first_seconds: float  # the same up to its first verdict, without a repair: what a retry's estimate scales

    def as_dict(self) -> dict:
        """Its entry in UpdateResult.candidates."""
        return {
            "version": self.version.version,
            "promoted": self.verdict.promoted,
            "reasons": self.verdict.reasons,
            "seconds": round(self.seconds, 1),
            "emphasis": asdict(self.mix.emphasis),
        }


@dataclass
class EveningUpdate:
    """One update of an adapter. Each candidate goes through the phases
    plan_mix -> train (into a staging folder) -> evaluate -> decide -> publish (live, or kept as a record),
    and run() trains candidates until one is promoted or no retry is left.

    open() reads what every candidate shares, once, under the update lock. The update holds a llama.cpp engine
    on the base: use it as a context manager, which closes the engine.
    """

    name: str
    data: Path  # the new knowledge file
    eval_suite: Path | None  # its suite
    settings: UpdateSettings
    progress: bool
    log: Callable[[str], object]
    begun: float  # when the update began (time.time()): max_update_seconds counts from here
    live: adapter_store.AdapterVersion  # every candidate continues from it
    base: model_store.ModelEntry
    new: list[Example]
    quality: QualityReport  # the new data's dataset check: it ran once, before anything was trained
    chain: list[adapter_store.AdapterVersion]  # the live version and its ancestors, newest first
    earlier: list[Example]  # their new data: what is replayed
    config: TrainConfig
    engine: EngineProcess
    preservation: list[Example]  # the base's own answers, the pool base preservation draws from
    suites: dict[str, list[EvalItem]]  # every suite a candidate is evaluated on, oldest first
    new_suite: str | None  # which of them is the new knowledge's (given with --eval: gated as new knowledge)
    # Without --eval, a suite derived from the new data (evaluate.derive_suite): scored and kept with the
    # version, so later updates check it is retained, but not gated as new knowledge (its facts are guessed).
    derived_suite: str | None
    live_eval: dict  # the live version's scores: retention is relative to them
    rewrites: dict[str, list[str]] = field(default_factory=dict)  # new answer -> its paraphrased questions
    candidates: list[Candidate] = field(default_factory=list)

    @classmethod
    def open(
        cls,
        name: str,
        data: Path,
        *,
        eval_suite: Path | None,
        settings: UpdateSettings,
        progress: bool,
        log: Callable[[str], object],
        begun: float,
    ) -> EveningUpdate:
        """Read the live version, the new data (checked here, once), what is replayed and every suite, and score
        the live version where its manifest does not say how it does."""
        live = adapter_store.resolve(name)
        if live.manifest.imported_from is not None or "training_config" not in (live.manifest.config or {}):
            raise ScalpelError(
                f"{live.ref} was imported, not trained here: an update continues a version's own training, so it "
                "needs the training config and PEFT weights of a version scalpel trained (train one with "
                "`scalpel train` and update that)",
                param="adapter",
                code="not_trained_here",
            )
        base = model_store.get(live.manifest.require_base().name)
        new = load_examples(data)
        quality = check(new)
        if quality.errors:
            first = quality.errors[0]
            raise ScalpelError(f"{first.where}: {first.message}", param=first.where, code="dataset_errors")
        new_items = evaluate.load_suite(eval_suite) if eval_suite else None  # a bad suite fails before training
        chain = lineage(live)
        earlier = [e for v in chain for e in _version_examples(v)]
        config = _update_config(name, live, chain[-1], settings)
        # In its own process: after a candidate is trained, torch's threads in this one slow llama.cpp down about
        # four times (see evaluate.judge_staged).
        engine = EngineProcess(base)
        try:
            pool = preservation.preservation_pool(engine) if settings.preservation_ratio else []
            rewrites = {}
            if settings.paraphrases:
                drawn = paraphrase.paraphrase(
                    engine,
                    new,
                    ParaphraseSettings(per_answer=settings.paraphrases, seed=settings.seed),
                    progress=progress,
                    log=log,
                )
                rewrites = paraphrase.kept(drawn)
            suites: dict[str, list[EvalItem]] = {}
            for v in reversed(chain):  # oldest first, as the knowledge was added
                for f in sorted(v.path.glob("eval/*.json")):
                    suites.setdefault(f.stem, evaluate.load_suite(f))
            new_suite = eval_suite.stem if eval_suite else None
            live_eval = _live_eval(engine, live, {k: v for k, v in suites.items() if k != new_suite}, log)
            derived_suite = None
            if new_suite is not None and new_items is not None:
                suites[new_suite] = new_items
            elif derived := evaluate.derive_suite(new):
                derived_suite = _derived_name(Path(data).stem, suites)
                suites[derived_suite] = derived
        except BaseException:
            engine.close()
            raise
        return cls(
            name=name,
            data=data,
            eval_suite=eval_suite,
            settings=settings,
            progress=progress,
            log=log,
            begun=begun,
            live=live,
            base=base,
            new=new,
            quality=quality,
            chain=chain,
            earlier=earlier,
            config=config,
            engine=engine,
            preservation=pool,
            suites=suites,
            new_suite=new_suite,
            derived_suite=derived_suite,
            live_eval=live_eval,
            rewrites=rewrites,
        )

    def __enter__(self) -> EveningUpdate:
        """The update itself; leaving the block closes its engine."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the engine (llama.cpp contexts on the base and the candidates)."""
        self.engine.close()

    def run(self) -> None:
        """Train candidates from the live version until one is promoted, max_candidates were trained, or another
        would not end within max_update_seconds; each retry leans on what the candidate before it failed."""
        emphasis = first_emphasis(self.live, self.earlier, self.settings)
        while True:
            mix = self.plan_mix(emphasis)
            if self.candidates and not self.fits(mix):
                break
            candidate = self.try_candidate(mix)
            if candidate.verdict.promoted or len(self.candidates) >= self.settings.max_candidates:
                break
            self.log(
                f"{candidate.version.ref} failed its gates ({'; '.join(candidate.verdict.reasons)}); "
                "training another candidate from the live version"
            )
            emphasis = candidate.verdict.lean_next

    def try_candidate(self, mix: Mix) -> Candidate:
        """One candidate through every phase after plan_mix, with a repair before publish when it fell short on
        knowledge alone."""
        started = time.time()
        with self.train(mix) as staged:
            trained = time.time()
            first = self.decide(*self.evaluate(staged), mix.emphasis)
            judged = time.time()
            with self.repair(staged, mix, first, judged - trained) as (final, verdict):
                version = self.publish(final, verdict)
        self.candidates.append(Candidate(version, mix, verdict, time.time() - started, judged - started))
        return self.candidates[-1]

    def plan_mix(self, emphasis: Emphasis) -> Mix:
        """The next candidate's training data, leaning on `emphasis`."""
        # Seeded by the number of versions so far, so every candidate (a retry, the next evening, the same file
        # tried again on a later evening) replays different examples in a different order.
        rng = random.Random(f"{self.settings.seed}-{len(adapter_store.versions(self.live.path.parent))}")
        risk = None  # only a budgeted replay spends by risk; without one, first_emphasis carries the fragile
        if self.settings.replay_budget is not None:
            risk = replay_risk(self.live_eval, self.suites, self.earlier)
            if self.settings.keep_full_replay:
                risk.update(dict.fromkeys(carried_concepts(self.live, self.earlier), 0.0))
        new, replay, preserve = training_mix(
            self.new, self.earlier, self.preservation, self.settings, emphasis, rng, risk, self.rewrites
        )
        examples = new + replay + preserve
        rng.shuffle(examples)
        return Mix(emphasis, new, replay, preserve, examples)

    def fits(self, mix: Mix) -> bool:
        """Whether a candidate on `mix` would end within max_update_seconds, estimated from the last one's time
        per training example."""
        last = self.candidates[-1]
        estimate = last.first_seconds * len(mix.examples) / len(last.mix.examples)
        if time.time() - self.begun + estimate <= self.settings.max_update_seconds:
            return True
        self.log(
            f"no retry: another candidate would take about {estimate:.0f} s, past the "
            f"{self.settings.max_update_seconds:.0f} s an update may take"
        )
        return False

    @contextlib.contextmanager
    def train(self, mix: Mix) -> Iterator[StagedVersion]:
        """Train a candidate from the live version's weights on `mix` (then polish it, when polish finds new
        concepts under-learned), and stage it: converted, in a staging folder, with its manifest in memory. The
        folder is gone after the block unless publish moved it."""
        emphasis = mix.emphasis
        repeats = f" (each {emphasis.new_repeats} times)" if emphasis.new_repeats > 1 else ""
        in_full = f" (all of {', '.join(emphasis.replay_in_full)})" if emphasis.replay_in_full else ""
        self.log(
            f"{self.phase('train')} update {self.name}, candidate {len(self.candidates) + 1}: "
            f"{len(self.new)} new examples{repeats}, "
            f"{len(mix.replay)} replayed from {len(self.chain)} version(s){in_full}, "
            f"{len(mix.preservation)} base-preservation examples; continuing from {self.live.ref}"
        )
        data, extra = self.staging(mix)
        with (
            stage_version(
                self.config,
                data,
                model=self.base.name,
                init_adapter=self.live.path,
                progress=self.progress,
                manifest_extra=extra,
            ) as staged,
            self.polish(staged, mix) as final,
        ):
            yield self._with_derived_suite(final)

    def staging(self, mix: Mix) -> tuple[TrainingData, dict]:
        """What a candidate on `mix` is staged with: its training data, the files its version keeps, and its
        manifest's records of the update and the preservation."""
        # The mix is handed to training in memory, so there is no file to name: the manifest names the new data
        # it was drawn from, with the hash of the mix as trained (two candidates on one file differ). The version
        # keeps the new data and its suite, not the mix: later updates replay a version's own new data.
        kept = {
            f"data/train{self.data.suffix or '.json'}": self.data,
            **({f"eval/{self.eval_suite.name}": self.eval_suite} if self.eval_suite else {}),
        }
        datasets = {"train": DatasetRef(path=str(self.data.resolve()), sha256=examples_hash(mix.examples))}
        data = TrainingData(mix.examples, self.quality, datasets, kept)
        return data, {"update": self.update_record(mix), "preservation": self.preservation_record(mix)}

    @contextlib.contextmanager
    def polish(self, staged: StagedVersion, mix: Mix) -> Iterator[StagedVersion]:
        """The candidate itself, or, when polish_mix finds new concepts under-learned, the candidate trained
        polish_epochs more on them, from its own weights, staged beside it."""
        polish = self.polish_mix(staged, mix)
        if polish is None:
            yield staged
            return
        concepts, examples = polish
        self.log(
            f"{self.phase('polish')} {', '.join(concepts)} still under-learned (training loss above "
            f"{self.settings.polish_loss:g}): {self.settings.polish_epochs:g} more epoch(s) on {len(examples)} "
            "examples, from the candidate"
        )
        record = {
            "concepts": concepts,
            "examples": len(examples),
            "sha256": examples_hash(examples),  # the polish's mix (datasets.train hashes the first phase's)
            "epochs": self.settings.polish_epochs,
            "first_train_seconds": round(staged.train_seconds, 1),
            "first_concept_loss": {c: staged.manifest.metrics.concept_loss.get(c) for c in concepts},
        }
        with self.continued(staged, mix, examples, "polish", record, {"num_epochs": self.settings.polish_epochs}) as (
            polished
        ):
            yield polished

    @contextlib.contextmanager
    def repair(
        self, staged: StagedVersion, mix: Mix, verdict: Verdict, evaluation_seconds: float, round_: int = 1
    ) -> Iterator[tuple[StagedVersion, Verdict]]:
        """The candidate and its verdict, or, when it failed on knowledge alone (new concepts answered wrong, or
        earlier answers lost; the base intact) and a repair fits in the time left, the candidate trained
        repair_epochs more on those concepts, from its own weights, at repair_rate_scale times the rate, and
        judged again: a fraction of a retry from the live version, aimed at what the evaluation found. A repaired
        candidate that still falls short is repaired again on what it still gets wrong, up to repair_rounds."""
        failed = verdict.failed
        taught = {e.concept for e in self.new}  # a suite may ask about a concept the new data does not teach
        wrong = sorted(set().union(*map(_wrong, failed.under_learned)) & taught)
        known = {e.concept for e in self.earlier}  # and an earlier suite about one no version taught
        lost = sorted((set().union(*failed.lost.values()) & known) - taught)
        if verdict.promoted or not self.settings.repair_epochs or not (wrong or lost) or failed.base:
            yield staged, verdict
            return
        if not all(failed.lost.get(name, set()) & set(lost) for name in failed.forgotten) or (
            failed.under_learned and not wrong
        ):
            # A suite below min_retention whose lost answers the repair cannot retrain (their concepts are the new
            # data's, or no version taught them), or a new suite failed only on concepts the new data does not
            # teach: it would stay below, so the repair would be time for nothing (and maybe a retry's).
            yield staged, verdict
            return
        phases = (staged.manifest.update.model_extra or {}) if staged.manifest.update else {}
        last = phases.get("repair") or phases.get("polish")  # the phase that staged it, when not the first one's
        earlier_rounds = [*(last or {}).get("earlier_rounds", []), last] if round_ > 1 and last else []
        kept, kept_lost = recently_repaired(earlier_rounds, wrong, lost)
        examples = self.focus_mix(wrong + kept, mix, "repair", lost + kept_lost)
        # The optimizer steps scale with examples x epochs, at the rate of the phase that staged the candidate
        # (the polish, when there was one); what surrounds them (loading the model, the loss per concept,
        # saving), the conversion and the evaluation cost what the candidate's did.
        metrics = staged.manifest.metrics
        done = (metrics.examples or len(mix.examples)) * (
            last["epochs"] if last else self.config.training_config.num_epochs
        )
        steps = (metrics.model_extra or {}).get("train_runtime") or staged.train_seconds
        around = staged.train_seconds - steps
        estimate = steps * len(examples) * self.settings.repair_epochs / done + around
        estimate += staged.convert_seconds + evaluation_seconds
        if time.time() - self.begun + estimate > self.settings.max_update_seconds:
            self.log(
                f"{self.phase('repair')} no repair: it would take about {estimate:.0f} s, past the "
                f"{self.settings.max_update_seconds:.0f} s an update may take"
            )
            yield staged, verdict
            return
        rate = self.config.training_config.learning_rate * self.settings.repair_rate_scale
        aimed = [f"{', '.join(wrong)} answered wrong"] if wrong else []
        aimed += [f"{', '.join(lost)} forgotten"] if lost else []
        aimed += [f"{', '.join(kept + kept_lost)} repaired before, kept"] if kept or kept_lost else []
        self.log(
            f"{self.phase('repair')} round {round_}: {'; '.join(aimed)}: {self.settings.repair_epochs:g} more "
            f"epoch(s) on {len(examples)} examples at learning rate {rate:.2g}, from the candidate"
        )
        record = {
            "round": round_,
            "concepts": wrong,
            "forgotten": lost,  # earlier concepts retrained with all their examples
            "kept": kept + kept_lost,  # repaired in an earlier round and right now: trained again, whole
            "examples": len(examples),
            "sha256": examples_hash(examples),
            "epochs": self.settings.repair_epochs,
            "learning_rate": rate,
            "first_reasons": verdict.reasons,  # what the candidate (or the round before) failed
            "earlier_rounds": [{k: v for k, v in r.items() if k != "earlier_rounds"} for r in earlier_rounds],
        }
        overrides = {"num_epochs": self.settings.repair_epochs, "learning_rate": rate}
        with self.continued(staged, mix, examples, "repair", record, overrides) as repaired:
            repaired = self._with_derived_suite(repaired)
            started = time.time()
            again = self.decide(*self.evaluate(repaired), mix.emphasis)
            if round_ >= self.settings.repair_rounds:
                yield self.kept_round((staged, verdict), (repaired, again), round_)
                return
            with self.repair(repaired, mix, again, time.time() - started, round_ + 1) as result:
                yield self.kept_round((staged, verdict), result, round_)

    def kept_round(
        self, before: tuple[StagedVersion, Verdict], after: tuple[StagedVersion, Verdict], round_: int
    ) -> tuple[StagedVersion, Verdict]:
        """The repaired candidate, unless it falls shorter than the one it was repaired from (which is then
        published instead): a repair can trade one lost answer for two."""
        if shortfall(after[1]) <= shortfall(before[1]):
            return after
        self.log(
            f"{self.phase('repair')} round {round_} and after it fell shorter than before it "
            f"({'; '.join(after[1].reasons)}): the candidate before it is kept"
        )
        before[1].outcome["repair_not_kept"] = {"round": round_, "reasons": after[1].reasons}
        return before

    @contextlib.contextmanager
    def continued(
        self, staged: StagedVersion, mix: Mix, examples: list[Example], phase: str, record: dict, overrides: dict
    ) -> Iterator[StagedVersion]:
        """`staged` trained further on `examples` from its own weights (`overrides`: of its training config),
        staged beside it, with the candidate's kept files and records; the manifest's update.<phase> says how."""
        data, extra = self.staging(mix)
        update = staged.manifest.update.model_dump(mode="json", by_alias=True) if staged.manifest.update else {}
        training = self.config.training_config.model_copy(update=overrides)
        with stage_version(
            self.config.model_copy(update={"training_config": training}),
            TrainingData(examples, data.quality, data.datasets, data.keep_files),
            model=self.base.name,
            init_adapter=staged.stage,
            progress=self.progress,
            manifest_extra={**extra, "update": {**extra["update"], **update, phase: record}},
        ) as further:
            # The version's config is the update's, not this phase's epochs: the next update continues from it
            # (update.<phase>.epochs says how long it trained).
            further.manifest.config = staged.manifest.config
            yield further

    def _with_derived_suite(self, staged: StagedVersion) -> StagedVersion:
        """The staged candidate, with the suite derived from the new data (when there is one) in its eval/."""
        if self.derived_suite is not None:
            evaluate.write_suite(staged.stage / "eval" / f"{self.derived_suite}.json", self.suites[self.derived_suite])
        return staged

    def polish_mix(self, staged: StagedVersion, mix: Mix) -> tuple[list[str], list[Example]] | None:
        """The new concepts the candidate's training loss shows under-learned, and what a polish trains on
        (focus_mix); None when polish is off or nothing is above polish_loss."""
        if not self.settings.polish_epochs:
            return None
        loss = staged.manifest.metrics.concept_loss
        new_concepts = sorted({e.concept for e in self.new})
        concepts = [c for c in new_concepts if loss.get(c, 0.0) > self.settings.polish_loss]
        if not concepts:
            return None
        return concepts, self.focus_mix(concepts, mix, "polish")

    def focus_mix(self, concepts: list[str], mix: Mix, salt: str, earlier: list[str] | tuple = ()) -> list[Example]:
        """What a polish or a repair trains on: all the new examples of `concepts` and all the earlier examples of
        the `earlier` concepts (forgotten), as many of the other new concepts' examples, and replay and
        preservation drawn from the candidate's mix in proportion."""
        rng = random.Random(f"{self.settings.seed}-{salt}-{len(self.candidates)}")
        examples = [e for e in self.new if e.concept in concepts]
        examples += [e for e in self.earlier if e.concept in earlier]
        share = min(1.0, len(examples) / len(self.new))
        # The other new concepts were learned minutes ago and are the likeliest to be overwritten (on the
        # 100-concept benchmark, polishing one person's explanation turned two other new people's roles into its
        # own): as many of their examples as the focused ones, beside the replay of older concepts.
        others = [e for e in self.new if e.concept not in concepts]
        fresh = rng.sample(others, min(len(others), len(examples)))
        replayed = [e for e in mix.replay if e.concept not in earlier]  # the forgotten are in already, whole
        replay = rng.sample(replayed, round(share * len(replayed)))
        preserve = rng.sample(mix.preservation, round(share * len(mix.preservation)))
        focus = examples + fresh + replay + preserve
        rng.shuffle(focus)
        return focus

    def update_record(self, mix: Mix) -> dict:
        """The manifest's "update": what the candidate was trained on, and from which version."""
        return {
            "new_data": str(self.data.resolve()),
            "new_examples": len(self.new),
            "replayed": len(mix.replay),
            "preservation": len(mix.preservation),
            "from": self.live.ref,
            "candidate": len(self.candidates) + 1,
            "emphasis": asdict(mix.emphasis),
            "retry_of": self.candidates[-1].version.version if self.candidates else None,
            **({"paraphrases": self.paraphrase_record()} if self.settings.paraphrases else {}),
        }

    def paraphrase_record(self) -> dict:
        """The manifest's update.paraphrases: how many rewrites were kept, and which, by the question rewritten."""
        groups = paraphrase.questions_by_answer(self.new)
        kept = {groups[answer][0]: questions for answer, questions in self.rewrites.items() if questions}
        return {"answers": len(groups), "kept": sum(map(len, kept.values())), "questions": kept}

    def preservation_record(self, mix: Mix) -> dict:
        """The manifest's "preservation", as a first version's says it."""
        on = self.settings.preservation() if self.settings.preservation_ratio else None
        return preservation.record(on, len(mix.preservation), len(self.preservation))

    def evaluate(self, staged: StagedVersion) -> tuple[EvalReport, SuiteChecker]:
        """Score the staged candidate through llama.cpp: the new suite, every earlier suite (teacher-forced where
        retention_check is "forced"), the general questions and base regression; its eval.png and report say how
        it does. The checker says how the suites were checked, and each concept's risk."""
        checker = SuiteChecker(
            (self.live_eval.get("suites") or {}) if self.settings.retention_check == "forced" else {},
            frozenset(n for n in (self.new_suite, self.derived_suite) if n is not None),
            self.progress,
        )
        self.log(
            f"{self.phase('evaluate')} evaluating the new version through llama.cpp: {len(self.suites)} suite(s), "
            "general questions and base regression"
        )
        # Unloaded after: a rejected candidate is not served; the next one is staged afresh.
        report = evaluate.evaluate_version(
            self.engine, staged.version, self.suites, f"{self.name}@next", progress=self.progress, runner=checker
        )
        kept = staged.manifest.preservation
        evaluate.record(report, staged.stage, preservation.described(kept.model_dump() if kept else None))
        return report, checker

    def decide(self, report: EvalReport, checker: SuiteChecker, emphasis: Emphasis) -> Verdict:
        """Promote the candidate if it passes every gate; otherwise say which failed, and what a retry leans on."""
        failed = failed_gates(report, self.new_suite, self.settings, self.live_eval)
        reasons = gate_decision(failed, self.settings)
        lean_next = retry_emphasis(failed, report, emphasis)
        return Verdict(
            reasons,
            lean_next,
            failed=failed,
            outcome={
                **report.as_dict(),
                "retention": failed.retention,
                "gates": self.settings.model_dump(),
                "promoted": not reasons,
                "reasons": reasons,
                "live_before": self.live.ref,
                "lean_next": asdict(lean_next),
                **checker.record(),
            },
        )

    def publish(self, staged: StagedVersion, verdict: Verdict) -> adapter_store.AdapterVersion:
        """Publish the candidate as the next version, live only when it was promoted: a rejected one is kept as a
        record (versions are never lost) and the live version stays live."""
        staged.manifest.eval = verdict.outcome
        version = publish_staged(staged, activate=verdict.promoted)
        outcome = "live" if verdict.promoted else "kept, not live: " + "; ".join(verdict.reasons)
        self.log(f"{self.phase('publish')} {version.ref} {outcome}")
        return version

    def phase(self, name: str) -> str:
        """Where the update is, for its log lines: "[candidate 2/3: evaluate]"."""
        return f"[candidate {len(self.candidates) + 1}/{self.settings.max_candidates}: {name}]"

    def result(self, seconds: float) -> UpdateResult:
        """The update's result: the last candidate's, with every candidate listed."""
        last = self.candidates[-1]
        return UpdateResult(
            last.version,
            last.verdict.promoted,
            last.verdict.reasons,
            last.verdict.outcome,
            seconds,
            [c.as_dict() for c in self.candidates],
        )


def run_update(
    name: str,
    data: Path,
    *,
    eval_suite: Path | None = None,
    settings: UpdateSettings | None = None,
    progress: bool = True,
    log=print,
) -> UpdateResult:
    """Train NAME's next version on `data` and promote it only if it passes every gate (with a retry)."""
    settings = settings or UpdateSettings()
    begun = time.time()
    with (
        update_lock(name),
        EveningUpdate.open(
            name,
            Path(data),
            eval_suite=Path(eval_suite) if eval_suite else None,
            settings=settings,
            progress=progress,
            log=log,
            begun=begun,
        ) as update,
    ):
        update.run()
    result = update.result(time.time() - begun)
    _record(name, result)
    log(
        f"{result.version.ref}: "
        + (
            "promoted, now live"
            if result.promoted
            else f"NOT promoted; {update.live.ref} stays live ({'; '.join(result.reasons)})"
        )
    )
    return result


def _derived_name(stem: str, taken: dict) -> str:
    """A derived suite's name, `<stem>.derived`, or, when an earlier version's suite has it, the first of
    `<stem>-2.derived`, `<stem>-3.derived`... that none has."""
    name, n = stem + evaluate.DERIVED_SUFFIX, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}{evaluate.DERIVED_SUFFIX}"
    return name


def _live_eval(engine: EngineProcess, live: adapter_store.AdapterVersion, suites: dict, log) -> dict:
    """The live version's scores on the earlier suites and base regression: from its manifest when it was
    evaluated on all of them (every update records that), else measured now."""
    recorded = live.manifest.eval or {}
    if set(suites) <= set(recorded.get("suites") or {}) and recorded.get("base_regression"):
        return recorded
    log(f"evaluating the live version {live.ref} first (its manifest has no complete evaluation)")
    return evaluate.evaluate(engine, ((engine.load(live), 1.0),), suites, live.ref).as_dict()


def _record(name: str, update: UpdateResult) -> None:
    """One JSON line per update in .scalpel/updates.jsonl: what ran, when, and what it decided."""
    line = {
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "adapter": name,
        "version": update.version.version,
        "promoted": update.promoted,
        "reasons": update.reasons,
        "seconds": round(update.seconds, 1),
        "candidates": [{k: c[k] for k in ("version", "promoted", "reasons")} for c in update.candidates],
        "suites": {k: v["accuracy"] for k, v in update.eval["suites"].items()},
        "base_agreement": (update.eval.get("base_regression") or {}).get("agreement"),
    }
    paths.state_dir().mkdir(parents=True, exist_ok=True)
    with open(paths.state_dir() / "updates.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


HELD = ".held.json"  # in the inbox: knowledge files that were not promoted yet, and how often they were tried


def run_inbox(
    name: str,
    inbox: Path,
    *,
    settings: UpdateSettings | None = None,
    attempts: int = INBOX_ATTEMPTS,
    progress: bool = True,
    log=print,
) -> list[UpdateResult]:
    """Process every knowledge file in `inbox` (oldest first), each with its `<stem>.eval.json` suite if there
    is one.

    A promoted file moves to inbox/archive/<time>/. A file whose update failed its gates stays in the inbox and
    is tried again on the next run, from whatever version is live then, until it has been tried `attempts`
    times; then it moves to inbox/not-promoted/<time>/ with the reasons. A file that cannot be read moves to
    inbox/rejected/<time>/ with the error. Files whose names start with "." are not knowledge.
    """
    inbox = Path(inbox)
    if not inbox.is_dir():
        raise ScalpelError(f"inbox {inbox} is not a folder", param="inbox")
    if attempts < 1:
        raise ScalpelError(f"attempts must be at least 1, not {attempts}", param="attempts")
    held_file = inbox / HELD
    held = read_json(held_file, "inbox state") if held_file.is_file() else {}
    if not isinstance(held, dict):
        raise ScalpelError(
            f"{held_file}: expected an object of held files, got {type(held).__name__}",
            param=str(held_file),
            code="invalid_json",
        )
    held = {f: tried for f, tried in held.items() if (inbox / f).is_file()}  # a file taken out is forgotten
    files = sorted(
        (
            f
            for f in inbox.iterdir()
            if f.is_file()
            and f.suffix in (".json", ".jsonl")
            and not f.name.startswith(".")
            and not f.name.endswith(".eval.json")
        ),
        key=lambda f: (f.stat().st_mtime, f.name),
    )
    results = []
    for index, f in enumerate(files, 1):
        log(f"[inbox {index}/{len(files)}] {f.name}")
        suite = f.with_name(f"{f.stem}.eval.json")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        digest = sha256_file(f)
        tried = held.pop(f.name, None) or {}  # back in `held` only if the file stays in the inbox
        if tried.get("sha256") != digest:  # new, or changed since it was last tried: it starts over
            tried = {"attempts": 0, "versions": []}
        try:
            result = run_update(
                name, f, eval_suite=suite if suite.is_file() else None, settings=settings, progress=progress, log=log
            )
        except ConflictError:
            raise
        except ScalpelError as exc:
            log(f"{f.name}: rejected: {exc.message}")
            target = _move_out(inbox / "rejected" / stamp, f, suite)
            (target / f"{f.name}.error.txt").write_text(exc.message + "\n", encoding="utf-8")
        else:
            results.append(result)
            tried = {
                "sha256": digest,
                "attempts": tried["attempts"] + 1,
                "versions": tried["versions"] + [result.version.version],
                "reasons": result.reasons,
            }
            if result.promoted:
                log(f"{f.name}: promoted as {result.version.ref}; archived in archive/{stamp}")
                _move_out(inbox / "archive" / stamp, f, suite)
            elif tried["attempts"] >= attempts:
                log(f"{f.name}: not promoted after {tried['attempts']} attempt(s); moved to not-promoted/{stamp}")
                target = _move_out(inbox / "not-promoted" / stamp, f, suite)
                write_json(target / f"{f.name}.attempts.json", tried)
            else:
                log(
                    f"{f.name}: not promoted (attempt {tried['attempts']} of {attempts}); it stays in the inbox "
                    "for the next run"
                )
                held[f.name] = tried
        write_json(held_file, held)
    if not files:
        log(f"inbox {inbox}: nothing to do")
    return results


def _move_out(target: Path, *files: Path) -> Path:
    """Move a knowledge file (and its suite, when there is one) from the inbox into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for moved in files:
        if moved.is_file():
            moved.rename(target / moved.name)
    return target

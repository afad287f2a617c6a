"""Write a knowledge benchmark at scale: fictional people, projects, places, procedures and numbers that no base
model can know, spread over evenings, each concept with its training examples, a suite of its training questions
and a held-out suite of paraphrased questions that never appear in training.

    .venv/bin/python bench/knowledge_gen.py --concepts 100 --evenings 20 --seed 0 --out DIR [--foundation-concepts 5]

Everything comes from one seeded random generator, so a seed gives byte-identical files. Names are made of
syllables and checked against a list of real words (REAL_WORDS: the whole-word tokens of the default model's
vocabulary that the syllables can spell). Each fact type has two disjoint pools of question templates: training
questions are drawn from the first, held-out paraphrases from the second, and answers lead with the fact. Concepts
differ in size and style (one-line facts, numbered step lists, explanations of about 150 words built from the
facts), and some are related: a person leads a project, a town was founded by a person, a constant was measured by
one, and a few concepts have a twin with a near-identical name and close figures, taught on a later evening, so
that one can overwrite the other.

DIR gets, for the foundation (evening 0) and each evening NN: eveningNN.json (the training examples, the plan's
{instruction, output, concept} format), eveningNN.eval.json (the training-question suite, which the update gates
on), eveningNN.paraphrase.eval.json (the held-out suite, scored by bench/evenings.py only), and manifest.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = 1  # manifest.json's "format": bump when the files change shape

# ----- names -----

ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "tr",
    "th",
    "gr",
    "sk",
]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei"]
MIDDLES = ["", "", "n", "r", "l", "s"]
ENDINGS = ["n", "r", "l", "s", "th", "x", "k", "m", "nd", "sk", "v", "ra", "na", "el", "is", "ek"]
# Real words the syllables can spell, or spell with one vowel changed (as a twin is made): the whole-word tokens of
# the default model's vocabulary that match (spellable_words; refresh with --write-words). No name is one of them.
WORDS_FILE = Path(__file__).with_name("knowledge_words.txt")
REAL_WORDS = frozenset(WORDS_FILE.read_text(encoding="utf-8").split())


def _spelling() -> re.Pattern:
    def alternatives(parts: list[str]) -> str:
        return "(?:" + "|".join(sorted({re.escape(p) for p in parts}, key=len, reverse=True)) + ")"

    syllable = alternatives(ONSETS) + alternatives(VOWELS) + alternatives(MIDDLES)
    last = alternatives(ONSETS) + alternatives(VOWELS) + alternatives(ENDINGS)
    return re.compile(f"(?:{syllable}){{1,2}}{last}")


def spellable_words(vocabulary: list[str]) -> list[str]:
    """The words of a tokenizer vocabulary (GPT-2 style: a leading 'Ġ' marks a whole word) that a name or a twin
    could be: 5 to 10 letters that the syllables spell, as they are or with one vowel changed."""
    spelling = _spelling()
    found = set()
    for token in vocabulary:
        word = token[1:].lower()
        if not (token.startswith("\u0120") and word.isascii() and word.isalpha() and 5 <= len(word) <= 10):
            continue
        variants = [word] + [word[:i] + v + word[i + 1 :] for i, c in enumerate(word) if c in "aeiou" for v in "aeiou"]
        if any(spelling.fullmatch(v) for v in variants):
            found.add(word)
    return sorted(found)


def _syllables(rng: random.Random, count: int) -> list[str]:
    parts = [rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(MIDDLES) for _ in range(count - 1)]
    return parts + [rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(ENDINGS)]


class Names:
    """Unique made-up words: no real word, none inside another (so a required phrase never matches a neighbour)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _ok(self, word: str) -> bool:
        return (
            5 <= len(word) <= 10
            and word not in REAL_WORDS
            and not any(word in other or other in word for other in self.used)
        )

    def new(self, syllables: tuple[int, ...] = (2, 2, 3)) -> str:
        while True:  # a draw is rejected a few times in a thousand: this ends
            word = "".join(_syllables(self.rng, self.rng.choice(syllables)))
            if self._ok(word):
                self.used.add(word)
                return word.capitalize()

    def twin(self, word: str) -> str:
        """A near-identical word: one of its vowels changed (Tarnel -> Tornel)."""
        lower = word.lower()
        spots = [i for i in range(1, len(lower)) if lower[i] in "aeiou" and lower[i - 1] not in "aeiou"]
        self.rng.shuffle(spots)
        for i in spots:
            for vowel in self.rng.sample("aeiou", 5):
                candidate = lower[:i] + vowel + lower[i + 1 :]
                runs = set(re.findall("[aeiou]+", candidate))
                spelled = runs <= set(VOWELS) | set(re.findall("[aeiou]+", lower))  # no new "ii" or "oe"
                if candidate != lower and spelled and self._ok(candidate):
                    self.used.add(candidate)
                    return candidate.capitalize()
        return self.new()  # no near-identical spelling was free: an unrelated name


# ----- what the facts are about -----

ROLES = [
    "chief hydrologist",
    "lead cartographer",
    "signal engineer",
    "seed bank curator",
    "tide surveyor",
    "bridge inspector",
    "orchard geneticist",
    "lighthouse keeper",
    "ferry dispatcher",
    "acoustics researcher",
    "glassworks supervisor",
    "beekeeping instructor",
    "archive restorer",
    "weather balloon pilot",
    "soil chemist",
    "tunnel surveyor",
    "clockmaker",
    "textile conservator",
    "salt marsh ecologist",
    "radio astronomer",
    "canal lock operator",
    "fungus taxonomist",
    "kiln engineer",
    "mapmaking teacher",
]
UNITS = [
    "kilopascals",
    "meters per second",
    "lumens per watt",
    "joules per gram",
    "hertz",
    "newtons per square meter",
    "kelvin per hour",
    "liters per minute",
    "grams per liter",
    "volts",
]
PHASES = [  # a project's phases: (the phase, the words an answer must contain)
    ("survey the riverbed", "riverbed"),
    ("build a scale model", "scale model"),
    ("pour the foundations", "foundations"),
    ("calibrate the sensors", "sensors"),
    ("train the field crews", "field crews"),
    ("publish the findings", "findings"),
    ("plant the test orchard", "orchard"),
    ("lay the fibre cable", "fibre cable"),
    ("raise the signal mast", "signal mast"),
    ("dredge the harbour", "harbour"),
    ("map the cave system", "cave system"),
    ("restore the old mill", "old mill"),
    ("seal the storage vaults", "storage vaults"),
    ("test the prototype engine", "prototype engine"),
]
STEPS = [  # a procedure's steps
    ("close the intake valve", "intake valve"),
    ("record the pressure gauge", "pressure gauge"),
    ("drain the cooling loop", "cooling loop"),
    ("rinse the filter screen", "filter screen"),
    ("tighten the flange bolts", "flange bolts"),
    ("reset the control panel", "control panel"),
    ("sign the logbook", "logbook"),
    ("wait for the green lamp", "green lamp"),
    ("open the vent hatch", "vent hatch"),
    ("weigh the sample jar", "sample jar"),
    ("label the copper tags", "copper tags"),
    ("lower the safety bar", "safety bar"),
    ("switch on the blower", "blower"),
    ("sweep the loading bay", "loading bay"),
    ("check the brass seals", "brass seals"),
    ("ring the signal bell", "signal bell"),
]
COUNT_WORDS = {3: "three", 4: "four", 5: "five", 6: "six"}

# ----- question templates: per fact type, a training pool and a disjoint held-out pool -----
# {name} is the concept's name as a sentence would use it: "Vorlask Tenmi", "Project Tarnel", "the Dravik constant".
# No held-out template's longest literal run (signature) occurs in a training question, and no training
# template's in a held-out one: tests/bench/test_knowledge_gen.py checks both on the written files.

TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "role": (
        ["What is {name}'s role?", "What does {name} do for a living?", "What is {name}'s job?"],
        ["Which line of work is {name} in?", "How does {name} earn an income?", "Tell me the occupation of {name}."],
    ),
    "birth_year": (
        ["When was {name} born?", "What year was {name} born?", "What is {name}'s year of birth?"],
        ["{name} came into the world in which year?", "Tell me the birth year of {name}.", "How old is {name}?"],
    ),
    "home_town": (
        ["Where is {name} from?", "What is {name}'s home town?", "Which town does {name} come from?"],
        ["Where did {name} grow up?", "Name the town {name} calls home.", "In what place was {name} raised?"],
    ),
    "leads": (
        ["Which project does {name} lead?", "What project is {name} in charge of?", "What does {name} lead?"],
        ["{name} heads which project?", "Which effort is run by {name}?", "Name the project under {name}."],
    ),
    "codename": (
        ["What is the codename of {name}?", "What codename does {name} use?", "What is {name} called internally?"],
        ["Under which code name does {name} run?", "{name} goes by what internal name?"],
    ),
    "launch_year": (
        ["When was {name} launched?", "What year did {name} launch?", "In which year was {name} launched?"],
        ["When did {name} get started?", "{name} began in what year?", "What was the start date of {name}?"],
    ),
    "project_lead": (
        ["Who leads {name}?", "Who is the lead of {name}?", "Who is in charge of {name}?"],
        ["Who heads {name}?", "Which person runs {name}?", "Under whose direction does {name} work?"],
    ),
    "phases": (
        ["What are the phases of {name}?", "List the phases of {name}.", "What stages does {name} go through?"],
        ["In what order does {name} proceed?", "Walk me through {name} from start to finish."],
    ),
    "population": (
        ["What is the population of {name}?", "How many people live in {name}?", "How populous is {name}?"],
        ["How many inhabitants does {name} have?", "Roughly how many residents call {name} home?"],
    ),
    "founder": (
        ["Who founded {name}?", "Who is the founder of {name}?", "Who established {name}?"],
        ["{name} was started by whom?", "Which person set up the town of {name}?"],
    ),
    "founded_year": (
        ["When was {name} founded?", "What year was {name} founded?", "In which year was {name} established?"],
        ["Since which year has {name} existed?", "{name} dates back to which year?"],
    ),
    "steps": (
        ["What are the steps of {name}?", "How do you carry out {name}?", "List the steps of {name}."],
        ["Walk me through {name}.", "How is {name} performed, one step after another?"],
    ),
    "first_step": (
        ["What is the first step of {name}?", "How does {name} begin?", "What do you do first in {name}?"],
        ["Which step opens {name}?", "What comes at the very start of {name}?"],
    ),
    "last_step": (
        ["What is the last step of {name}?", "How does {name} end?", "What do you do last in {name}?"],
        ["Which step closes {name}?", "What comes at the very end of {name}?"],
    ),
    "step_count": (
        ["How many steps does {name} have?", "How many steps are in {name}?"],
        ["{name} consists of how many steps?", "What is the number of steps in {name}?"],
    ),
    "value": (
        ["What is the value of {name}?", "What is {name}?", "How large is {name}?"],
        ["What number does {name} equal?", "Give me the figure for {name}."],
    ),
    "unit": (
        ["In what unit is {name} measured?", "What is the unit of {name}?"],
        ["Which unit goes with {name}?", "{name} is expressed in which units?"],
    ),
    "measured_by": (
        ["Who measured {name}?", "Who first determined {name}?"],
        ["Whose measurement gave us {name}?", "{name} was worked out by whom?"],
    ),
    "overview_person": (
        ["Tell me about {name}.", "Who is {name}?", "Describe {name}."],
        ["Give me an overview of {name}.", "What should I know about {name}?"],
    ),
    "overview": (
        ["Tell me about {name}.", "What is {name}?", "Describe {name}."],
        ["Give me an overview of {name}.", "What should I know about {name}?"],
    ),
}
# "What is {name}?" asks for a constant's value but for a project's overview: the fact type, not the wording,
# says what is asked, so the same training template may serve two types (never a held-out one).


def normalise(text: str) -> str:
    """Lower case, punctuation gone, single spaces: how questions are compared."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def signature(template: str) -> str:
    """A template's distinctive part: its longest literal run between placeholders, normalised."""
    return max((normalise(part) for part in template.split("{name}")), key=len)


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


# ----- concepts -----


@dataclass
class Fact:
    """One thing a concept teaches: the answer (it leads with the fact) and what a right answer must contain."""

    type: str
    answer: str
    required: list[str]
    match: str = "all"
    forbidden: list[str] = field(default_factory=list)


@dataclass
class Concept:
    id: str
    kind: str  # person, project, place, procedure, number
    name: str  # as a sentence would use it
    size: str  # small, medium, large
    data: dict  # the raw facts (years, names, steps...), for relations and the explanation
    facts: list[Fact] = field(default_factory=list)
    evening: int = 0
    relations: list[dict] = field(default_factory=list)  # {"type", "to": concept id}


def _steps_answer(subject: str, noun: str, steps: list[str]) -> str:
    lines = "\n".join(f"{i}. {_sentence(step)}." for i, step in enumerate(steps, 1))
    return f"{_sentence(subject)} has {COUNT_WORDS[len(steps)]} {noun}:\n{lines}"


FILLERS = {
    "person": [
        "Colleagues describe {short} as patient and methodical, someone who explains every decision before making it.",
        "{short} keeps a handwritten notebook of each day's work, and newcomers are often lent a copy of it.",
        "On most mornings {short} is the first to arrive and the last to leave the workshop.",
        "{short} prefers small, careful experiments to grand plans, and insists that every result is checked twice.",
        "Younger staff say they learned more from one afternoon with {short} than from a month of lectures.",
        "Outside of work, {short} repairs old bicycles and gives them away to students.",
        "{short} has written several short guides for the team, each of them plain, practical and easy to follow.",
        "When a problem stalls, {short} asks the whole group to describe it again in their own words.",
        "{short} answers letters from strangers about the work, and keeps every reply in a wooden box.",
        "Friends say {short} can talk for an hour about old maps, and often does.",
    ],
    "project": [
        "The team behind {short} meets every Monday to review what was learned the week before.",
        "Each phase of {short} ends with a written review, so that no lesson is lost between phases.",
        "{short} is funded in stages, and every stage must show its results before the next one begins.",
        "Visitors to {short} are shown the original sketches, which still hang on the wall of the site office.",
        "The work of {short} is shared openly, and other groups are encouraged to repeat its measurements.",
        "Volunteers from nearby towns help {short} during the busiest weeks of the year.",
        "Every decision in {short} is recorded in a shared log that anyone on the team can read.",
        "The people of {short} work in small crews, and each crew chooses its own way of reporting progress.",
        "Most of the equipment used by {short} was built on site from plain, cheap parts.",
        "Early mistakes in {short} are written up as carefully as its successes, so others can avoid them.",
    ],
    "place": [
        "{short} sits in a wide valley, and its streets follow the line of an old river bed.",
        "The market square of {short} fills every Saturday with farmers and traders from the hills.",
        "Most houses in {short} are built of pale stone quarried a short walk from the town.",
        "{short} keeps a small museum of tools that its first settlers brought with them.",
        "Every autumn {short} holds a lantern festival that draws visitors from the whole region.",
        "A narrow railway links {short} with the coast, and the trip takes most of a morning.",
        "The town council of {short} still meets in the hall its first settlers built.",
        "Children in {short} learn to swim in the cold lake just north of the houses.",
        "The bakery on the main street of {short} opens before dawn, and the whole town smells of bread.",
        "Travellers remember {short} for its narrow bridges and its painted wooden shutters.",
    ],
    "procedure": [
        "{short} is carried out by two people, so that one can read each step aloud while the other performs it.",
        "Skipping a step of {short} is never allowed, even when the work is urgent.",
        "Every run of {short} is written into the shift log with the time and the names of both operators.",
        "New staff practise {short} on a training rig before they perform it on the real equipment.",
        "{short} was written after a long night when the old way of working failed, and it has saved many since.",
        "If anything looks wrong during {short}, the operators stop, call the supervisor and start again.",
        "A printed card with {short} hangs beside the equipment, so nobody has to work from memory.",
        "Supervisors review {short} once a year and change it only when the whole team agrees.",
        "Teams that follow {short} closely report far fewer repairs than teams that improvise.",
    ],
}


def _explanation(concept: Concept, facts: list[str]) -> str:
    """About 150 words: the concept's facts first, then its kind's background sentences, in a seeded order."""
    rng = random.Random(concept.id)  # the concept's own order: independent of what else was drawn
    short = concept.data.get("short", concept.name)
    fillers = [f.format(short=short) for f in FILLERS[concept.kind]]
    rng.shuffle(fillers)
    sentences = [_sentence(f) for f in facts]
    for filler in fillers:
        if sum(len(s.split()) for s in sentences) >= 140:
            break
        sentences.append(_sentence(filler))
    return " ".join(sentences)


# Which facts each size keeps, per kind; "overview" adds a ~150-word explanation.
SIZES = {
    "person": {
        "small": ["role", "birth_year"],
        "medium": ["role", "birth_year", "home_town", "leads"],
        "large": ["role", "birth_year", "home_town", "leads", "overview"],
    },
    "project": {
        "small": ["codename", "launch_year"],
        "medium": ["codename", "launch_year", "project_lead", "phases"],
        "large": ["codename", "launch_year", "project_lead", "phases", "overview"],
    },
    "place": {
        "small": ["population", "founder"],
        "medium": ["population", "founder", "founded_year"],
        "large": ["population", "founder", "founded_year", "overview"],
    },
    "procedure": {
        "small": ["steps", "first_step"],
        "medium": ["steps", "first_step", "last_step", "step_count"],
        "large": ["steps", "first_step", "last_step", "step_count", "overview"],
    },
    "number": {
        "small": ["value"],
        "medium": ["value", "unit", "measured_by"],
    },
}
# The mix of kinds, 20 at a time, interleaved so that a small set has a bit of each.
KIND_PATTERN = [
    "person",
    "project",
    "number",
    "place",
    "procedure",
    "person",
    "project",
    "number",
    "person",
    "place",
] + ["procedure", "person", "project", "number", "person", "place", "procedure", "person", "project", "number"]


class World:
    """Every entity, drawn from one seeded generator: the concepts taught and the extra names they mention."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.names = Names(self.rng)

    def person_name(self) -> tuple[str, str]:
        return self.names.new((2,)), self.names.new((2, 3))

    def person(self) -> dict:
        first, last = self.person_name()
        return {
            "name": f"{first} {last}",
            "short": first,
            "surname": last,
            "role": self.rng.choice(ROLES),
            "birth_year": self.rng.randint(1931, 1996),
            "home_town": self.names.new(),
        }

    def project(self, twin_of: dict | None = None) -> dict:
        word = self.names.twin(twin_of["word"]) if twin_of else self.names.new()
        year = twin_of["launch_year"] + self.rng.choice([-2, -1, 1, 2]) if twin_of else self.rng.randint(1978, 2022)
        first, last = self.person_name()
        return {
            "name": f"Project {word}",
            "short": f"Project {word}",
            "word": word,
            "codename": self.names.new((2,)),
            "launch_year": year,
            "lead": f"{first} {last}",
            "lead_surname": last,
            "phases": self.rng.sample(PHASES, self.rng.randint(3, 5)),
        }

    def place(self) -> dict:
        word = self.names.new()
        first, last = self.person_name()
        return {
            "name": word,
            "short": word,
            "word": word,
            "population": self.rng.randrange(800, 95000, 50),
            "founder": f"{first} {last}",
            "founder_surname": last,
            "founded_year": self.rng.randint(1520, 1905),
        }

    def procedure(self, twin_of: dict | None = None) -> dict:
        word = self.names.twin(twin_of["word"]) if twin_of else self.names.new()
        count = self.rng.randint(3, 6)
        if twin_of:  # the same opening, a different rest: the steps one can mix up
            rest = [s for s in STEPS if s not in twin_of["steps"]]
            steps = twin_of["steps"][:2] + self.rng.sample(rest, max(1, count - 2))
        else:
            steps = self.rng.sample(STEPS, count)
        return {"name": f"the {word} procedure", "short": f"the {word} procedure", "word": word, "steps": steps}

    def number(self, twin_of: dict | None = None) -> dict:
        word = self.names.twin(twin_of["word"]) if twin_of else self.names.new()
        unit = twin_of["unit"] if twin_of else self.rng.choice(UNITS)
        while True:
            if twin_of:  # a close figure: the same whole part, other decimals
                whole, decimals = twin_of["value"].split(".")
                value = f"{whole}." + "".join(self.rng.choice("0123456789") for _ in decimals)
            else:
                value = f"{self.rng.uniform(0.1, 90):.{self.rng.randint(2, 4)}f}"
            if not twin_of or (value not in twin_of["value"] and twin_of["value"] not in value):
                break
        first, last = self.person_name()
        return {
            "name": f"the {word} constant",
            "short": f"the {word} constant",
            "word": word,
            "value": value,
            "unit": unit,
            "measured_by": f"{first} {last}",
            "measured_by_surname": last,
        }


def _facts(concept: Concept, twin: Concept | None) -> list[Fact]:
    """The concept's facts, each with its answer (leading with the fact) and its scoring."""
    d, name = concept.data, concept.name
    twin_data = twin.data if twin else {}
    made: dict[str, Fact] = {}
    if concept.kind == "person":
        article = "an" if d["role"][0] in "aeiou" else "a"
        made["role"] = Fact("role", f"{name} works as {article} {d['role']}.", [d["role"]])
        made["birth_year"] = Fact("birth_year", f"{name} was born in {d['birth_year']}.", [str(d["birth_year"])])
        made["home_town"] = Fact("home_town", f"{name} comes from the town of {d['home_town']}.", [d["home_town"]])
        if "leads" in d:
            made["leads"] = Fact("leads", f"{name} leads {d['leads']}.", [d["leads_word"]])
        explained = [made[k].answer for k in ("role", "birth_year", "home_town", "leads") if k in made]
        required = [d["role"], d["home_town"]]
    elif concept.kind == "project":
        made["codename"] = Fact("codename", f"The codename of {name} is {d['codename']}.", [d["codename"]])
        made["launch_year"] = Fact(
            "launch_year",
            f"{name} was launched in {d['launch_year']}.",
            [str(d["launch_year"])],
            forbidden=[str(twin_data["launch_year"])] if twin_data else [],
        )
        made["project_lead"] = Fact("project_lead", f"{name} is led by {d['lead']}.", [d["lead_surname"]])
        made["phases"] = Fact(
            "phases", _steps_answer(name, "phases", [p for p, _ in d["phases"]]), [k for _, k in d["phases"]]
        )
        explained = [made[k].answer for k in ("codename", "launch_year", "project_lead")]
        explained.append(
            f"Its phases are to {', then '.join(p for p, _ in d['phases'][:-1])}, and finally to {d['phases'][-1][0]}."
        )
        required = [d["codename"], str(d["launch_year"])]
    elif concept.kind == "place":
        population = f"{d['population']:,}"
        made["population"] = Fact(
            "population",
            f"{name} has a population of {population}.",
            list(dict.fromkeys([population, str(d["population"])])),
            match="any",
        )
        made["founder"] = Fact("founder", f"{name} was founded by {d['founder']}.", [d["founder_surname"]])
        made["founded_year"] = Fact(
            "founded_year", f"{name} was founded in {d['founded_year']}.", [str(d["founded_year"])]
        )
        explained = [made[k].answer for k in ("population", "founder", "founded_year")]
        required = [d["founder_surname"], str(d["founded_year"])]
    elif concept.kind == "procedure":
        steps = [s for s, _ in d["steps"]]
        count = len(steps)
        made["steps"] = Fact("steps", _steps_answer(name, "steps", steps), [k for _, k in d["steps"]])
        made["first_step"] = Fact("first_step", f"The first step of {name} is to {steps[0]}.", [d["steps"][0][1]])
        made["last_step"] = Fact("last_step", f"The last step of {name} is to {steps[-1]}.", [d["steps"][-1][1]])
        made["step_count"] = Fact(
            "step_count",
            f"{_sentence(name)} has {COUNT_WORDS[count]} steps.",
            [COUNT_WORDS[count], str(count)],
            match="any",
            forbidden=[COUNT_WORDS[len(twin_data["steps"])]] if twin_data and len(twin_data["steps"]) != count else [],
        )
        middle = ", then ".join(steps[1:-1])  # a procedure has three steps or more
        explained = [
            made["step_count"].answer,
            f"It starts when you {steps[0]}, continues as you {middle}, and ends when you {steps[-1]}.",
        ]
        required = [d["steps"][0][1], d["steps"][-1][1]]
    else:  # number
        made["value"] = Fact(
            "value",
            f"{_sentence(name)} is {d['value']} {d['unit']}.",
            [d["value"]],
            forbidden=[twin_data["value"]] if twin_data else [],
        )
        made["unit"] = Fact("unit", f"{_sentence(name)} is measured in {d['unit']}.", [d["unit"]])
        made["measured_by"] = Fact(
            "measured_by", f"{_sentence(name)} was measured by {d['measured_by']}.", [d["measured_by_surname"]]
        )
        explained, required = [], []
    wanted = SIZES[concept.kind][concept.size]
    facts = [made[k] for k in wanted if k != "overview" and k in made]
    if "overview" in wanted:
        facts.append(
            Fact(
                "overview_person" if concept.kind == "person" else "overview",
                _explanation(concept, explained),
                required,
            )
        )
    for fact in facts:
        fact.answer = _sentence(fact.answer)
    return facts


@dataclass
class Output:
    """What one concept writes: its training records, its training-question items and its held-out items."""

    training: list[dict]
    suite: list[dict]
    paraphrases: list[dict]


def _item(question: str, concept: Concept, fact: Fact) -> dict:
    return {
        "question": question,
        "concept": concept.id,
        "required": fact.required,
        "match": fact.match,
        "forbidden": fact.forbidden,
    }


def write_concept(concept: Concept, rng: random.Random) -> Output:
    """Training examples (every training phrasing of every fact, one answer per fact), the suite (one training
    question per fact) and the held-out paraphrases (one held-out question per fact)."""
    training, suite, paraphrases = [], [], []
    for fact in concept.facts:
        train_pool, held_pool = TEMPLATES[fact.type]
        questions = [_sentence(t.format(name=concept.name)) for t in train_pool]
        training += [{"instruction": q, "output": fact.answer, "concept": concept.id} for q in questions]
        suite.append(_item(rng.choice(questions), concept, fact))
        paraphrases.append(_item(_sentence(rng.choice(held_pool).format(name=concept.name)), concept, fact))
    return Output(training, suite, paraphrases)


def build(concepts: int, evenings: int, seed: int, foundation: int = 5) -> tuple[dict[str, Output], list[Concept]]:
    """The world for a seed: `foundation` concepts for evening 0, then `concepts` spread evenly over `evenings`."""
    if concepts < evenings or evenings < 1 or foundation < 1:
        raise ValueError("need at least one concept per evening and at least one foundation concept")
    world = World(seed)
    total = foundation + concepts
    kinds = [KIND_PATTERN[i % len(KIND_PATTERN)] for i in range(total)]
    world.rng.shuffle(kinds)
    made: list[Concept] = []
    by_kind: dict[str, list[Concept]] = {}
    twins: dict[str, str] = {}  # twin id -> original id
    partner: dict[str, str] = {}  # either of a pair -> the other
    for kind in kinds:
        earlier = [c for c in by_kind.get(kind, []) if c.id not in twins and c.id not in twins.values()]
        twin_of = (
            earlier[-1] if kind in ("project", "procedure", "number") and earlier and world.rng.random() < 0.2 else None
        )
        if kind == "person":
            data = world.person()
            cid = f"{data['short']}_{data['surname']}".lower()
        elif kind == "project":
            data = world.project(twin_of.data if twin_of else None)
            cid = f"project_{data['word']}".lower()
        elif kind == "place":
            data = world.place()
            cid = f"town_{data['word']}".lower()
        elif kind == "procedure":
            data = world.procedure(twin_of.data if twin_of else None)
            cid = f"procedure_{data['word']}".lower()
        else:
            data = world.number(twin_of.data if twin_of else None)
            cid = f"constant_{data['word']}".lower()
        sizes = list(SIZES[kind])
        concept = Concept(cid, kind, data["name"], world.rng.choice(sizes), data)
        if twin_of:
            twins[cid] = twin_of.id
            partner.update({cid: twin_of.id, twin_of.id: cid})
            concept.relations.append({"type": "similar_name", "to": twin_of.id})
            twin_of.relations.append({"type": "similar_name", "to": cid})
        made.append(concept)
        by_kind.setdefault(kind, []).append(concept)
    _relate(world.rng, by_kind)
    # Spread over the evenings: shuffled, then each twin moved after its original, so it comes later.
    order = made[:]
    world.rng.shuffle(order)
    for twin_id, original_id in twins.items():
        i = next(k for k, c in enumerate(order) if c.id == twin_id)
        j = next(k for k, c in enumerate(order) if c.id == original_id)
        if i < j:
            order[i], order[j] = order[j], order[i]
    per_evening = [concepts // evenings + (e < concepts % evenings) for e in range(evenings)]
    evening_of = [0] * foundation + [e + 1 for e, n in enumerate(per_evening) for _ in range(n)]
    for concept, evening in zip(order, evening_of, strict=True):
        concept.evening = evening
    by_id = {c.id: c for c in order}
    for concept in order:
        concept.facts = _facts(concept, by_id[partner[concept.id]] if concept.id in partner else None)
    outputs = {c.id: write_concept(c, random.Random(f"{seed}-{c.id}")) for c in order}
    return outputs, order


def _states(concept: Concept, fact: str) -> bool:
    """Whether the concept's size keeps this fact (a relation is only made where both sides say it)."""
    return fact in SIZES[concept.kind][concept.size]


def _relate(rng: random.Random, by_kind: dict[str, list[Concept]]) -> None:
    """Tie concepts together: people lead projects, people found towns and measure constants, towns are homes."""
    people = by_kind.get("person", [])[:]
    rng.shuffle(people)
    leaders = iter([p for p in people if _states(p, "leads")])
    homeless = [p for p in people if _states(p, "home_town")]
    for project in by_kind.get("project", []):
        if _states(project, "project_lead") and rng.random() < 0.7 and (person := next(leaders, None)) is not None:
            project.data.update(lead=person.name, lead_surname=person.data["surname"])
            person.data.update(leads=project.name, leads_word=project.data["word"])
            project.relations.append({"type": "led_by", "to": person.id})
            person.relations.append({"type": "leads", "to": project.id})
    for place in by_kind.get("place", []):
        if people and rng.random() < 0.4:
            founder = rng.choice(people)
            year = founder.data["birth_year"] + rng.randint(25, 50)  # founded in the founder's lifetime
            place.data.update(founder=founder.name, founder_surname=founder.data["surname"], founded_year=year)
            place.relations.append({"type": "founded_by", "to": founder.id})
            founder.relations.append({"type": "founded", "to": place.id})
        if homeless and rng.random() < 0.6:
            resident = homeless.pop(rng.randrange(len(homeless)))
            resident.data["home_town"] = place.name
            resident.relations.append({"type": "home_town", "to": place.id})
            place.relations.append({"type": "home_of", "to": resident.id})
    for constant in by_kind.get("number", []):
        if people and _states(constant, "measured_by") and rng.random() < 0.5:
            person = rng.choice(people)
            constant.data.update(measured_by=person.name, measured_by_surname=person.data["surname"])
            constant.relations.append({"type": "measured_by", "to": person.id})
            person.relations.append({"type": "measured", "to": constant.id})


def _dump(records: list[dict]) -> str:
    return json.dumps(records, indent=1, ensure_ascii=False) + "\n"


def file_stem(evening: int, evenings: int) -> str:
    return "foundation" if evening == 0 else f"evening{evening:0{max(2, len(str(evenings)))}d}"


def generate(concepts: int, evenings: int, seed: int, out: Path, foundation: int = 5) -> dict:
    """Write the set into `out` (made if missing; files of an earlier set there are replaced) and return the
    manifest."""
    outputs, order = build(concepts, evenings, seed, foundation)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, hashes = [], {}
    for evening in range(evenings + 1):
        stem = file_stem(evening, evenings)
        members = [c for c in order if c.evening == evening]
        texts = {
            f"{stem}.json": _dump([r for c in members for r in outputs[c.id].training]),
            f"{stem}.eval.json": _dump([r for c in members for r in outputs[c.id].suite]),
            f"{stem}.paraphrase.eval.json": _dump([r for c in members for r in outputs[c.id].paraphrases]),
        }
        for name, text in texts.items():
            (out / name).write_text(text, encoding="utf-8")
            hashes[name] = hashlib.sha256(text.encode("utf-8")).hexdigest()
        files.append(
            {
                "evening": evening,
                "data": f"{stem}.json",
                "suite": f"{stem}.eval.json",
                "paraphrases": f"{stem}.paraphrase.eval.json",
                "concepts": [c.id for c in members],
            }
        )
    manifest = {
        "generator": "bench/knowledge_gen.py",
        "format": FORMAT,
        "seed": seed,
        "concepts": concepts,
        "evenings": evenings,
        "foundation_concepts": foundation,
        "files": files,
        "concept_list": [
            {
                "id": c.id,
                "kind": c.kind,
                "name": c.name,
                "size": c.size,
                "evening": c.evening,
                "facts": [f.type for f in c.facts],
                "examples": len(outputs[c.id].training),
                "relations": c.relations,
            }
            for c in order
        ],
        "sha256": hashes,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def default_vocabulary() -> list[str]:
    """The default model's tokens, read from its GGUF (no model is loaded)."""
    import gguf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from core import model_store

    field = gguf.GGUFReader(str(model_store.default_gguf_file())).fields["tokenizer.ggml.tokens"]
    return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=100, help="concepts taught over the evenings")
    parser.add_argument("--evenings", type=int, default=20)
    parser.add_argument("--foundation-concepts", type=int, default=5, help="concepts of the foundation (evening 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder to write the set into")
    parser.add_argument(
        "--write-words",
        action="store_true",
        help=f"refresh {WORDS_FILE.name} from the default model's vocabulary, and stop",
    )
    args = parser.parse_args()
    if args.write_words:
        words = spellable_words(default_vocabulary())
        WORDS_FILE.write_text("\n".join(words) + "\n", encoding="utf-8")
        print(f"wrote {len(words)} words into {WORDS_FILE}")
        return
    if not args.out:
        parser.error("--out is required")
    try:
        manifest = generate(args.concepts, args.evenings, args.seed, Path(args.out), args.foundation_concepts)
    except ValueError as exc:
        parser.error(str(exc))
    kinds: dict[str, int] = {}
    for c in manifest["concept_list"]:
        kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
    examples = sum(c["examples"] for c in manifest["concept_list"])
    relations = sum(len(c["relations"]) for c in manifest["concept_list"]) // 2
    print(
        f"wrote {len(manifest['concept_list'])} concepts ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}) "
        f"over the foundation and {args.evenings} evenings, {examples} training examples, {relations} relations, "
        f"into {args.out}"
    )


if __name__ == "__main__":
    main()

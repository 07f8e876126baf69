"""Multi-hop questions over a generated knowledge base of people, cities, countries and companies.

Mechanisms: hallucination. The model knows a fact only with the popularity of its subject (a fixed
property of the model and the fact, so resampling does not help); for a fact it does not know and
cannot find in its context it invents a plausible name, and every later hop builds on the invention.
More hops mean more chances. A retrieve node puts the facts into the context, where the model reads
them instead. Random slips replace the final answer with another real entity of the right type.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from cegraph.daemon.sim.core import Family, SimCall, Task, answer_of, rng_for, unit
from cegraph.daemon.workflows.tools import Retriever, Tool

SYLLABLES = (
    "ka", "lo", "mi", "ra", "ven", "tor", "sil", "dra", "nu", "bel", "cor", "fen", "ga", "hal", "is", "jor",
    "ler", "mar", "nor", "pel", "quin", "ros", "tam", "ul", "vos", "wen", "zar", "ith", "esk", "ond",
)  # fmt: skip
SUFFIXES = ("Labs", "Works", "Systems", "Group")
PERSON = r"[A-Z][a-z]+ [A-Z][a-z]+"
PLACE = r"[A-Z][a-z]+"
COMPANY = r"[A-Z][a-z]+ (?:Labs|Works|Systems|Group)"
RELATIONS = {  # relation: (subject type, object type, sentence, sentence pattern, noun in reasoning)
    "born_in": ("person", "city", "{s} was born in {o}.", rf"({PERSON}) was born in ({PLACE})\.",
                "birthplace"),
    "located_in": ("city", "country", "{s} is a city in {o}.", rf"({PLACE}) is a city in ({PLACE})\.",
                   "country"),
    "founded_by": ("company", "person", "{s} was founded by {o}.",
                   rf"({COMPANY}) was founded by ({PERSON})\.", "founder"),
    "headquartered_in": ("company", "city", "{s} is headquartered in {o}.",
                         rf"({COMPANY}) is headquartered in ({PLACE})\.", "headquarters"),
}  # fmt: skip
QUESTIONS = (  # most specific first: the person pattern would also match "the founder of X"
    (("founded_by", "born_in", "located_in"), "In which country was the founder of {s} born?",
     rf"In which country was the founder of ({COMPANY}) born\?"),
    (("founded_by", "born_in"), "In which city was the founder of {s} born?",
     rf"In which city was the founder of ({COMPANY}) born\?"),
    (("headquartered_in", "located_in"), "In which country is {s} headquartered?",
     rf"In which country is ({COMPANY}) headquartered\?"),
    (("born_in", "located_in"), "In which country was {s} born?", rf"In which country was ({PERSON}) born\?"),
)  # fmt: skip
_FACTS = {relation: re.compile(spec[3]) for relation, spec in RELATIONS.items()}
_QUESTIONS = [(path, re.compile(pattern)) for path, _, pattern in QUESTIONS]


@dataclass
class KnowledgeBase:
    """Entities (name -> type, popularity) and facts ((subject, relation) -> object)."""

    types: dict[str, str] = field(default_factory=dict)
    popularity: dict[str, float] = field(default_factory=dict)
    facts: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def generate(cls, rng: random.Random, popularity: tuple[float, float]) -> KnowledgeBase:
        kb = cls()
        sizes = {"country": 8, "city": 24, "person": 40, "company": 20}
        names = {
            kind: [kb._add(rng, kind, popularity) for _ in range(count)] for kind, count in sizes.items()
        }
        for city in names["city"]:
            kb.facts[(city, "located_in")] = rng.choice(names["country"])
        for person in names["person"]:
            kb.facts[(person, "born_in")] = rng.choice(names["city"])
        for company in names["company"]:
            kb.facts[(company, "founded_by")] = rng.choice(names["person"])
            kb.facts[(company, "headquartered_in")] = rng.choice(names["city"])
        return kb

    def _add(self, rng: random.Random, kind: str, popularity: tuple[float, float]) -> str:
        name = self.invent(rng, kind)
        self.types[name] = kind
        self.popularity[name] = rng.uniform(*popularity)
        return name

    def invent(self, rng: random.Random, kind: str) -> str:
        """A fresh name of the given type that is not (yet) an entity."""
        while True:
            word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
            if kind == "person":
                word += " " + "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
            elif kind == "company":
                word += " " + rng.choice(SUFFIXES)
            if word not in self.types and not any(word in name or name in word for name in self.types):
                return word

    def sentences(self) -> list[tuple[str, str, str, str]]:
        """(sentence, subject, relation, object) for every fact."""
        return [(RELATIONS[r][2].format(s=s, o=o), s, r, o) for (s, r), o in self.facts.items()]

    def of_type(self, kind: str) -> list[str]:
        return [name for name, t in self.types.items() if t == kind]


class KnowledgeSearch:
    """Entity-linked retrieval: facts about the entities named in the query, then about the entities
    those facts name, `hops` rounds deep."""

    name = "kb_search"

    def __init__(self, kb: KnowledgeBase) -> None:
        self._facts = kb.sentences()
        names = sorted(kb.types, key=len, reverse=True)
        self._entities = re.compile("|".join(rf"\b{re.escape(name)}\b" for name in names))

    async def retrieve(self, query: str, *, top_k: int, hops: int) -> list[str]:
        frontier = set(self._entities.findall(query))
        found: list[str] = []
        for hop in range(hops):
            reached: set[str] = set()
            for sentence, subject, _, obj in self._facts:
                if sentence not in found and (subject in frontier or (hop == 0 and obj in frontier)):
                    found.append(sentence)
                    reached |= {subject, obj}
            frontier = reached
        return found[:top_k]


@dataclass(frozen=True)
class Problem:
    subject: str
    path: tuple[str, ...]
    question: str


@dataclass(frozen=True)
class Hop:
    subject: str
    relation: str
    object: str
    source: str  # "context", "memory" or "invented"


class QA(Family):
    name = "qa"
    check = "exact_match"

    @property
    def kb(self) -> KnowledgeBase:
        return self.world.kb

    def generate(self, rng: random.Random, index: int, **options: Any) -> Task:
        hops = options.get("hops")
        choices = [q for q in QUESTIONS if hops is None or len(q[0]) == int(hops)]
        path, template, _ = rng.choice(choices)
        subject = rng.choice(self.kb.of_type(RELATIONS[path[0]][0]))
        truth = self.truth(Problem(subject, path, ""))
        return Task(
            family=self.name,
            id=f"{self.name}-{index}",
            input={"question": template.format(s=subject)},
            truth=truth,
            features={
                "hops": len(path),
                "popularity": min(self.kb.popularity[e] for e in truth["chain"][:-1]),
            },
        )

    def truth(self, problem: Problem) -> dict[str, Any]:
        chain, entity = [problem.subject], problem.subject
        for relation in problem.path:
            entity = self.kb.facts[(entity, relation)]
            chain.append(entity)
        return {"answer": entity, "chain": chain}

    def find(self, text: str) -> Problem | None:
        for path, pattern in _QUESTIONS:
            match = pattern.search(text)
            if match and match.group(1) in self.kb.types:
                return Problem(match.group(1), path, match.group(0))
        return None

    def _chain(self, problem: Problem, model: str, text: str) -> list[Hop]:
        """What the model believes: facts in its context first, then memory, else an invention."""
        context = {
            (match.group(1), relation): match.group(2)
            for relation, pattern in _FACTS.items()
            for match in pattern.finditer(text)
        }
        hops, entity = [], problem.subject
        for relation in problem.path:
            if (entity, relation) in context:
                obj, source = context[(entity, relation)], "context"
            elif (entity, relation) in self.kb.facts and unit(
                model, "knows", entity, relation
            ) < self.kb.popularity[entity]:
                obj, source = self.kb.facts[(entity, relation)], "memory"
            else:
                obj, source = (
                    self.kb.invent(rng_for(model, "invent", entity, relation), RELATIONS[relation][1]),
                    "invented",
                )
            hops.append(Hop(entity, relation, obj, source))
            entity = obj
        return hops

    def _render(self, hops: list[Hop], final: str) -> str:
        steps = "; ".join(f"{RELATIONS[h.relation][4]} of {h.subject} -> {h.object}" for h in hops)
        return f"Reasoning: {steps}.\nAnswer: {final}"

    def answer(self, problem: Problem, call: SimCall) -> str:
        hops = self._chain(problem, call.model, call.text)
        final = hops[-1].object
        if call.rng.random() < self.rates.random_slip(call.temperature):
            others = [e for e in self.kb.of_type(RELATIONS[problem.path[-1]][1]) if e != final]
            final = call.rng.choice(others)
        return self._render(hops, final)

    def judge(self, problem: Problem, candidate: str, call: SimCall) -> str | None:
        given = answer_of(candidate)
        own = self._chain(problem, call.model, call.text)[-1].object
        if given is None:
            return "The answer is incomplete: it has no final 'Answer:' line."
        return None if given == own else f"The answer should be {own}, not {given}."

    def corrected(self, problem: Problem, candidate: str, call: SimCall) -> str:
        hops = self._chain(problem, call.model, call.text)
        return self._render(hops, hops[-1].object)

    async def verdict(self, task: Task, output: str) -> tuple[bool, float, str]:
        truth = task.truth["answer"]
        given = answer_of(output) or output.strip()
        if "\n" in given or not given:
            return False, 0.0, "missing answer: the output has no final 'Answer:' line"
        if given.casefold() == truth.casefold():
            return True, 1.0, f"correct: {truth}"
        known = {name.casefold(): kind for name, kind in self.kb.types.items()}
        if given.casefold() not in known:
            return (
                False,
                0.0,
                f"hallucination: {given!r} is not an entity of the knowledge base (expected {truth!r})",
            )
        return (
            False,
            0.0,
            f"wrong entity: answered {given!r} (a {known[given.casefold()]}), expected {truth!r}",
        )

    def tools(self) -> list[Tool | Retriever]:
        return [KnowledgeSearch(self.kb)]

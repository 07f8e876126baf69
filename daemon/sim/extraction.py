"""Extraction to JSON: an order e-mail becomes {customer, company, product, quantity, due_date}.

Mechanisms: format violations (prose around the JSON, a code fence, single quotes, a trailing comma,
capitalized keys), more likely with a longer, chattier e-mail and a higher temperature, less likely
when the prompt asks for JSON only and much less likely after a rejected attempt; a format node
rewrites the answer reliably. Random slips miscopy the quantity.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from datetime import date
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from cegraph.daemon.sim.core import Family, SimCall, Task

FIRST = ("Dana", "Omar", "Lena", "Tomas", "Priya", "Yuki", "Marta", "Jonas", "Aisha", "Felix", "Nora", "Ravi")
LAST = ("Whitfield", "Okafor", "Lindqvist", "Moreau", "Castillo", "Brandt", "Tanaka", "Novak", "Haddad")
COMPANIES = (
    "Orbitex",
    "Fernvale Foods",
    "Kestrel Works",
    "Bluepine Labs",
    "Marlow Textiles",
    "Quanta Retail",
)
PRODUCTS = (
    "steel hinge sets",
    "ceramic mugs",
    "oak desk lamps",
    "USB-C docks",
    "A4 paper reams",
    "bike pumps",
)
DISTRACTORS = (
    "Our previous order arrived on time, thank you.",
    "Please confirm the order by e-mail.",
    "We have moved to a new office downtown.",
    "The invoice should go to our accounts team.",
    "Let me know if anything is unclear.",
    "Our loading dock is closed on Sundays.",
)
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
KEYS = ("customer", "company", "product", "quantity", "due_date")
_NAME = r"[A-Z][a-z]+ [A-Z][a-z]+"
_GREETING = re.compile(r"(?:Hello, this is|Hi team,|Dear supplier,)[^\n]*")
_CUSTOMER = re.compile(rf"this is ({_NAME}) from|({_NAME}) here \(|Regards, ({_NAME})")
_COMPANY = re.compile(
    r"from ([A-Z][\w-]*(?: [A-Z][\w-]*)*)\.|here \(([^)]+)\)|to ([A-Z][\w-]*(?: [A-Z][\w-]*)*) by"
)
_ORDER = re.compile(r"(\d+) units of (.+?)(?= to [A-Z]| by | before |[.?])")
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})|([A-Z][a-z]+) (\d{1,2}), (\d{4})|(\d{1,2})/(\d{1,2})/(\d{4})")
_JSON_ONLY = re.compile(r"\bonly\b[^.\n]*\bjson\b|\bjson\b[^.\n]*\bonly\b", re.I)


class Order(BaseModel):
    """The exact output the evaluator accepts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    customer: str
    company: str
    product: str
    quantity: int
    due_date: str


@dataclass(frozen=True)
class Problem:
    document: str
    distractors: int
    fields: dict[str, Any]


def _first_group(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    return next((g for g in match.groups() if g), None) if match else None


def _iso(match: re.Match[str]) -> str:
    g = match.groups()
    if g[0]:
        return f"{g[0]}-{g[1]}-{g[2]}"
    if g[3]:
        return date(int(g[5]), MONTHS.index(g[3]) + 1, int(g[4])).isoformat()
    return date(int(g[8]), int(g[7]), int(g[6])).isoformat()


class Extraction(Family):
    name = "extraction"
    check = "fields"

    def generate(self, rng: random.Random, index: int, **options: Any) -> Task:
        customer = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        company, product = rng.choice(COMPANIES), rng.choice(PRODUCTS)
        quantity = rng.randint(2, 400)
        due = date.fromordinal(date(2025, 1, 1).toordinal() + rng.randrange(700))
        written = rng.choice(
            [
                due.isoformat(),
                f"{MONTHS[due.month - 1]} {due.day}, {due.year}",
                f"{due.day}/{due.month}/{due.year}",
            ]
        )
        template = rng.randrange(3)
        if template == 0:
            body = [
                f"Hello, this is {customer} from {company}.",
                f"We would like to order {quantity} units of {product}.",
                f"Please deliver them by {written}.",
            ]
        elif template == 1:
            body = [
                f"Hi team, {customer} here ({company}).",
                f"Could you send {quantity} units of {product} before {written}?",
                "Thanks!",
            ]
        else:
            body = [
                f"Dear supplier, please ship {quantity} units of {product} to {company} by {written}.",
                f"Regards, {customer}",
            ]
        count = int(options["distractors"]) if "distractors" in options else rng.randint(0, 4)
        for distractor in rng.sample(DISTRACTORS, count):
            body.insert(rng.randint(1, len(body) - 1), distractor)
        truth = {
            "customer": customer,
            "company": company,
            "product": product,
            "quantity": quantity,
            "due_date": due.isoformat(),
        }
        return Task(
            family=self.name,
            id=f"{self.name}-{index}",
            input={"document": " ".join(body)},
            truth=truth,
            features={"distractors": count, "template": template},
        )

    def find(self, text: str) -> Problem | None:
        match = _GREETING.search(text)
        if match is None:
            return None
        document = match.group(0)
        order, when = _ORDER.search(document), _DATE.search(document)
        customer, company = _first_group(_CUSTOMER, document), _first_group(_COMPANY, document)
        if not (order and when and customer and company):
            return None
        fields = {
            "customer": customer,
            "company": company,
            "product": order.group(2),
            "quantity": int(order.group(1)),
            "due_date": _iso(when),
        }
        return Problem(document, sum(d in document for d in DISTRACTORS), fields)

    def truth(self, problem: Problem) -> dict[str, Any]:
        return dict(problem.fields)

    def _fields(self, problem: Problem, call: SimCall) -> dict[str, Any]:
        fields = dict(problem.fields)
        if call.rng.random() < self.rates.random_slip(call.temperature):
            fields["quantity"] += call.rng.choice([-1, 1]) * call.rng.randint(1, 9)
        return fields

    def answer(self, problem: Problem, call: SimCall) -> str:
        rates, rng = self.rates, call.rng
        fields = self._fields(problem, call)
        violation = (
            rates.format_violation_base
            + rates.format_violation_per_distractor * problem.distractors
            + rates.format_violation_per_temperature * call.temperature
        )
        if _JSON_ONLY.search(call.system):
            violation *= rates.format_instruction_factor
        if call.feedback is not None:
            violation *= rates.format_feedback_factor
        if rng.random() >= violation:
            return json.dumps(fields)
        style = rng.randrange(4)
        if style == 0:
            return f"Here is the extracted order:\n```json\n{json.dumps(fields, indent=2)}\n```"
        if style == 1:
            return repr(fields)
        if style == 2:
            return json.dumps(fields, indent=2)[:-2] + ",\n}"
        return json.dumps({key.capitalize(): value for key, value in fields.items()})

    def judge(self, problem: Problem, candidate: str, call: SimCall) -> str | None:
        try:
            data = json.loads(candidate)
        except ValueError as error:
            return f"The output is not valid JSON ({error}); reply with the JSON object only."
        if not isinstance(data, dict):
            return "The output must be one JSON object."
        wrong = [key for key in KEYS if data.get(key) != problem.fields[key]]
        return f"These fields do not match the e-mail: {', '.join(wrong)}." if wrong else None

    def corrected(self, problem: Problem, candidate: str, call: SimCall) -> str:
        return json.dumps(problem.fields)

    async def verdict(self, task: Task, output: str) -> tuple[bool, float, str]:
        try:
            data = json.loads(output)
        except ValueError as error:
            return False, 0.0, f"format violation: the output is not valid JSON ({error})"
        try:
            order = Order.model_validate(data)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'output'}: {e['msg']}" for e in error.errors()
            )
            return False, 0.0, f"format violation: {problems}"
        wrong = [key for key in KEYS if getattr(order, key) != task.truth[key]]
        score = 1 - len(wrong) / len(KEYS)
        if not wrong:
            return True, 1.0, "all fields correct"
        details = ", ".join(
            f"{key} is {getattr(order, key)!r}, expected {task.truth[key]!r}" for key in wrong
        )
        return False, score, f"wrong field: {details}"

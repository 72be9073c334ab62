"""Built-in demo data set: multi-step arithmetic word problems with worked step-by-step solutions (ours).

`generate_arithmetic(n, seed=0, split="train")` is deterministic. Each problem is a short story (10 story templates,
12 names) whose quantity goes through `level` operations: add, add k groups of m, subtract, multiply by 2-4,
divide into 2-6 equal parts (always exact). Numbers stay small (start 5-40, every intermediate value 1-200) so a
135M model learns some of it in a few hundred CPU steps. The solution has one line per step with its equation
(`12 + 21 = 33`) and ends with `The answer is $\\boxed{N}$.`, the format MATH-style graders read.

Splits are kept apart twice: each split draws from its own random stream (seeded with the split name and `seed`),
and a problem belongs to exactly one split by a hash of its text (bucket 0 of 10: test, 1: validation, else train),
so no test problem text can appear in any train set, whatever the seeds and sizes.

Rows: `problem`, `solution`, `answer` (str of int), `unique_id` (`arith-train-000017`), `level` (number of steps),
`expression` (the arithmetic as a Python expression, e.g. `(12 + 3 * 7 - 9) / 4`).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

__all__ = ["SPLITS", "STORIES", "generate_arithmetic", "split_of"]

SPLITS = ("train", "validation", "test")
_BUCKETS = 10
MAX_VALUE = 200

NAMES = [
    ("Mia", "she", "her", "her"),
    ("Liam", "he", "his", "him"),
    ("Ava", "she", "her", "her"),
    ("Noah", "he", "his", "him"),
    ("Zoe", "she", "her", "her"),
    ("Omar", "he", "his", "him"),
    ("Priya", "she", "her", "her"),
    ("Kenji", "he", "his", "him"),
    ("Lucia", "she", "her", "her"),
    ("Ben", "he", "his", "him"),
    ("Sara", "she", "her", "her"),
    ("Tomas", "he", "his", "him"),
]
CONNECTORS = ["", "", "Then ", "Later, ", "After that, ", "Next, "]
TIMES = {2: "twice", 3: "three times", 4: "four times"}


@dataclass(frozen=True)
class Story:
    """One story template: a problem sentence and a solution line per operation.

    Placeholders: `{name}`, `{P}`/`{p}` (subject pronoun), `{poss}`, `{obj}`, `{a}` start value, `{b}` operand,
    `{k}`/`{m}` factors, `{g}` = k*m, `{kw}`/`{Kw}` ("twice", "three times"), `{x}` value before, `{y}` after.
    """

    key: str
    start: str
    sol_start: str
    add: tuple[str, str]
    groups: tuple[str, str]
    sub: tuple[str, str]
    mul: tuple[str, str]
    div: tuple[str, str]
    question: str


STORIES: list[Story] = [
    Story(
        "apples",
        "{name} has {a} apples.",
        "{name} starts with {a} apples.",
        ("{P} buys {b} more apples at the market.", "{P} buys {b} more, so {p} has {x} + {b} = {y} apples."),
        (
            "{P} buys {k} bags with {m} apples in each bag.",
            "The bags hold {k} * {m} = {g} apples, so {p} has {x} + {g} = {y} apples.",
        ),
        ("{P} gives {b} apples to {poss} neighbor.", "After giving away {b}, {p} has {x} - {b} = {y} apples."),
        ("{P} picks more apples until {p} has {kw} as many as before.", "{Kw} as many is {x} * {k} = {y} apples."),
        (
            "{P} splits {poss} apples equally into {k} baskets and keeps only one basket.",
            "One basket holds {x} / {k} = {y} apples.",
        ),
        "How many apples does {p} have now?",
    ),
    Story(
        "stickers",
        "{name} has a collection of {a} stickers.",
        "{name} starts with {a} stickers.",
        (
            "{P} gets {b} new stickers for {poss} birthday.",
            "{P} gets {b} new ones, so {p} has {x} + {b} = {y} stickers.",
        ),
        (
            "{P} buys {k} sticker sheets with {m} stickers on each sheet.",
            "The sheets have {k} * {m} = {g} stickers, so {p} has {x} + {g} = {y} stickers.",
        ),
        ("{P} trades away {b} stickers.", "After trading away {b}, {p} has {x} - {b} = {y} stickers."),
        (
            "{P} swaps toys for stickers and ends up with {kw} as many stickers.",
            "{Kw} as many is {x} * {k} = {y} stickers.",
        ),
        (
            "{P} divides {poss} stickers into {k} equal piles and keeps one pile.",
            "One pile has {x} / {k} = {y} stickers.",
        ),
        "How many stickers does {p} have now?",
    ),
    Story(
        "books",
        "{name} has {a} books on {poss} shelf.",
        "{name} starts with {a} books.",
        ("{P} receives {b} more books as a gift.", "{P} receives {b} more, so {p} has {x} + {b} = {y} books."),
        (
            "{P} buys {k} boxes of books with {m} books in each box.",
            "The boxes hold {k} * {m} = {g} books, so {p} has {x} + {g} = {y} books.",
        ),
        ("{P} donates {b} books to the library.", "After donating {b}, {p} has {x} - {b} = {y} books."),
        ("{P} buys books at a sale until {p} has {kw} as many books.", "{Kw} as many is {x} * {k} = {y} books."),
        (
            "{P} packs the books equally into {k} boxes and keeps only one box on the shelf.",
            "One box has {x} / {k} = {y} books.",
        ),
        "How many books are on {poss} shelf now?",
    ),
    Story(
        "cookies",
        "{name} bakes {a} cookies.",
        "{name} starts with {a} cookies.",
        ("{P} bakes {b} more cookies.", "{P} bakes {b} more, so {p} has {x} + {b} = {y} cookies."),
        (
            "{P} bakes {k} more trays with {m} cookies on each tray.",
            "The trays hold {k} * {m} = {g} cookies, so {p} has {x} + {g} = {y} cookies.",
        ),
        ("{P} sells {b} cookies.", "After selling {b}, {p} has {x} - {b} = {y} cookies."),
        ("{P} keeps baking until {p} has {kw} as many cookies.", "{Kw} as many is {x} * {k} = {y} cookies."),
        (
            "{P} puts the cookies equally into {k} jars and gives away all but one jar.",
            "One jar has {x} / {k} = {y} cookies.",
        ),
        "How many cookies does {p} have left?",
    ),
    Story(
        "money",
        "{name} has {a} dollars in {poss} piggy bank.",
        "{name} starts with {a} dollars.",
        ("{P} earns {b} dollars walking dogs.", "{P} earns {b} dollars, so {p} has {x} + {b} = {y} dollars."),
        (
            "{P} mows {k} lawns and earns {m} dollars for each lawn.",
            "Mowing pays {k} * {m} = {g} dollars, so {p} has {x} + {g} = {y} dollars.",
        ),
        ("{P} spends {b} dollars on a book.", "After spending {b}, {p} has {x} - {b} = {y} dollars."),
        (
            "{P} sells {poss} old bike and now has {kw} as much money as before.",
            "{Kw} as much is {x} * {k} = {y} dollars.",
        ),
        (
            "{P} splits {poss} money equally among {k} jars and takes only one jar to the fair.",
            "One jar has {x} / {k} = {y} dollars.",
        ),
        "How many dollars does {p} have now?",
    ),
    Story(
        "marbles",
        "{name} has {a} marbles.",
        "{name} starts with {a} marbles.",
        ("{P} wins {b} marbles in a game.", "{P} wins {b}, so {p} has {x} + {b} = {y} marbles."),
        (
            "{P} buys {k} bags of marbles with {m} marbles in each bag.",
            "The bags hold {k} * {m} = {g} marbles, so {p} has {x} + {g} = {y} marbles.",
        ),
        ("{P} loses {b} marbles.", "After losing {b}, {p} has {x} - {b} = {y} marbles."),
        (
            "{P} trades {poss} cards for marbles and ends up with {kw} as many marbles.",
            "{Kw} as many is {x} * {k} = {y} marbles.",
        ),
        (
            "{P} divides {poss} marbles into {k} equal groups and keeps one group.",
            "One group has {x} / {k} = {y} marbles.",
        ),
        "How many marbles does {p} have now?",
    ),
    Story(
        "eggs",
        "{name} collects {a} eggs on the farm.",
        "{name} starts with {a} eggs.",
        ("{P} collects {b} more eggs in the afternoon.", "{P} collects {b} more, so {p} has {x} + {b} = {y} eggs."),
        (
            "{P} finds {k} nests with {m} eggs in each nest.",
            "The nests hold {k} * {m} = {g} eggs, so {p} has {x} + {g} = {y} eggs.",
        ),
        ("{P} uses {b} eggs to make breakfast.", "After using {b}, {p} has {x} - {b} = {y} eggs."),
        ("By the end of the week {p} has {kw} as many eggs.", "{Kw} as many is {x} * {k} = {y} eggs."),
        (
            "{P} packs the eggs equally into {k} cartons and sells all but one carton.",
            "One carton has {x} / {k} = {y} eggs.",
        ),
        "How many eggs does {p} have now?",
    ),
    Story(
        "bus",
        "{name} drives a bus with {a} passengers on board.",
        "The bus starts with {a} passengers.",
        ("At the next stop, {b} passengers get on.", "{b} get on, so there are {x} + {b} = {y} passengers."),
        (
            "At the station, {k} groups of {m} passengers get on.",
            "The groups are {k} * {m} = {g} passengers, so there are {x} + {g} = {y} passengers.",
        ),
        ("At the next stop, {b} passengers get off.", "{b} get off, so there are {x} - {b} = {y} passengers."),
        (
            "At the stadium so many people get on that there are {kw} as many passengers.",
            "{Kw} as many is {x} * {k} = {y} passengers.",
        ),
        (
            "The passengers split into {k} equal groups and only one group stays on the bus.",
            "One group is {x} / {k} = {y} passengers.",
        ),
        "How many passengers are on the bus now?",
    ),
    Story(
        "pencils",
        "{name} has a box of {a} pencils.",
        "{name} starts with {a} pencils.",
        ("{P} finds {b} more pencils in {poss} desk.", "{P} finds {b} more, so {p} has {x} + {b} = {y} pencils."),
        (
            "{P} buys {k} packs with {m} pencils in each pack.",
            "The packs hold {k} * {m} = {g} pencils, so {p} has {x} + {g} = {y} pencils.",
        ),
        ("{P} hands out {b} pencils to {poss} classmates.", "After handing out {b}, {p} has {x} - {b} = {y} pencils."),
        ("{Poss} teacher gives {obj} enough pencils to have {kw} as many.", "{Kw} as many is {x} * {k} = {y} pencils."),
        (
            "{P} sorts the pencils into {k} equal cups and keeps one cup.",
            "One cup has {x} / {k} = {y} pencils.",
        ),
        "How many pencils does {p} have now?",
    ),
    Story(
        "fish",
        "{name}'s aquarium has {a} fish.",
        "The aquarium starts with {a} fish.",
        ("{P} adds {b} more fish.", "{P} adds {b}, so there are {x} + {b} = {y} fish."),
        (
            "{P} buys {k} bags with {m} fish in each bag and puts them in the aquarium.",
            "The bags hold {k} * {m} = {g} fish, so there are {x} + {g} = {y} fish.",
        ),
        ("{P} gives {b} fish to a friend.", "After giving away {b}, there are {x} - {b} = {y} fish."),
        ("The fish have babies, and now there are {kw} as many fish.", "{Kw} as many is {x} * {k} = {y} fish."),
        (
            "{P} divides the fish equally among {k} tanks and gives away all but one tank.",
            "One tank has {x} / {k} = {y} fish.",
        ),
        "How many fish are in {poss} aquarium now?",
    ),
]

_OPS = ("add", "groups", "sub", "mul", "div")
_WEIGHTS = {"add": 2.0, "groups": 2.0, "sub": 3.0, "mul": 1.5, "div": 1.5}


def split_of(problem: str) -> str:
    """The split a problem text belongs to (hash bucket 0 of 10: test, 1: validation, 2-9: train)."""
    bucket = int.from_bytes(hashlib.sha256(problem.encode("utf-8")).digest()[:8], "big") % _BUCKETS
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _fill(template: str, **kw) -> str:
    return template.format(**kw)


def _one_problem(rng: random.Random, steps: int) -> dict:
    story = rng.choice(STORIES)
    name, p, poss, obj = rng.choice(NAMES)
    names = {"name": name, "P": p.capitalize(), "p": p, "poss": poss, "Poss": poss.capitalize(), "obj": obj}
    x = rng.randint(5, 40)
    sentences = [_fill(story.start, a=x, **names)]
    lines = [_fill(story.sol_start, a=x, **names)]
    expr = str(x)
    prev = None
    for step in range(steps):
        available = ["add", "groups"]
        if x >= 2:
            available.append("sub")
        if x * 2 <= MAX_VALUE and prev != "div":
            available.append("mul")
        divisors = [k for k in range(2, 7) if x % k == 0 and x // k >= 1]
        if divisors and prev != "mul":
            available.append("div")
        op = rng.choices(available, weights=[_WEIGHTS[o] for o in available])[0]
        vals: dict = {"x": x}
        if op == "add":
            b = rng.randint(2, min(25, MAX_VALUE - x)) if x <= MAX_VALUE - 2 else None
            if b is None:  # at the cap: subtract instead
                op, b = "sub", rng.randint(1, min(x - 1, 30))
                y, expr = x - b, f"{expr} - {b}"
            else:
                y, expr = x + b, f"{expr} + {b}"
            vals.update(b=b, y=y)
        elif op == "groups":
            k, m = rng.randint(2, 6), rng.randint(2, 12)
            while x + k * m > MAX_VALUE and m > 1:
                m -= 1
            g = k * m
            if x + g > MAX_VALUE:  # at the cap: subtract instead
                op, b = "sub", rng.randint(1, min(x - 1, 30))
                y, expr = x - b, f"{expr} - {b}"
                vals.update(b=b, y=y)
            else:
                y, expr = x + g, f"{expr} + {k} * {m}"
                vals.update(k=k, m=m, g=g, y=y)
        elif op == "sub":
            b = rng.randint(1, min(x - 1, 30))
            y, expr = x - b, f"{expr} - {b}"
            vals.update(b=b, y=y)
        elif op == "mul":
            k = rng.choice([k for k in (2, 3, 4) if x * k <= MAX_VALUE])
            y, expr = x * k, f"({expr}) * {k}"
            vals.update(k=k, y=y, kw=TIMES[k], Kw=TIMES[k].capitalize())
        else:
            k = rng.choice(divisors)
            y, expr = x // k, f"({expr}) / {k}"
            vals.update(k=k, y=y)
        problem_tpl, solution_tpl = getattr(story, op)
        sentence = _fill(problem_tpl, **names, **vals)
        connector = rng.choice(CONNECTORS) if step > 0 else ""
        if connector and problem_tpl.startswith("{P}"):
            sentence = connector + sentence[0].lower() + sentence[1:]
        sentences.append(sentence)
        lines.append(_fill(solution_tpl, **names, **vals))
        prev, x = op, y
    sentences.append(_fill(story.question, **names))
    lines.append(f"The answer is $\\boxed{{{x}}}$.")
    return {"problem": " ".join(sentences), "solution": "\n".join(lines), "answer": str(x), "expression": expr}


DEFAULT_MAX_STEPS = 4  # operations per problem of `builtin:arithmetic` (2..4)


def generate_arithmetic(
    n: int, *, seed: int = 0, split: str = "train", min_steps: int = 2, max_steps: int = DEFAULT_MAX_STEPS
) -> list[dict]:
    """Generate `n` distinct arithmetic word problems with step-by-step solutions.

    Args:
        n: number of rows.
        seed: random seed; the same `(n, seed, split, min_steps, max_steps)` gives the same rows, and a larger `n`
            extends a smaller one (the first rows are shared).
        split: `"train"`, `"validation"` or `"test"`; each has its own random stream and only problems whose text
            hashes into the split's bucket (`split_of`), so splits never share a problem text.
        min_steps, max_steps: number of operations per problem, drawn uniformly (stored as `level`).

    Returns:
        Rows `{"problem", "solution", "answer", "unique_id", "level", "expression"}` (`answer` a string of an int
        that the solution ends on as `The answer is $\\boxed{N}$.`).

    Raises:
        ValueError: negative `n`, unknown split, or steps outside `1 <= min_steps <= max_steps <= 8`.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 1 <= min_steps <= max_steps <= 8:
        raise ValueError(f"need 1 <= min_steps <= max_steps <= 8, got min_steps={min_steps}, max_steps={max_steps}")
    rng = random.Random(f"tokensft-arithmetic/{split}/{seed}")
    rows: list[dict] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 200 * n + 1000
    while len(rows) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"Could not draw {n} distinct {split} problems in {max_attempts} attempts")
        steps = rng.randint(min_steps, max_steps)
        row = _one_problem(rng, steps)
        if row["problem"] in seen or split_of(row["problem"]) != split:
            continue
        seen.add(row["problem"])
        rows.append(
            {
                "problem": row["problem"],
                "solution": row["solution"],
                "answer": row["answer"],
                "unique_id": f"arith-{split}-{len(rows):06d}",
                "level": steps,
                "expression": row["expression"],
            }
        )
    return rows

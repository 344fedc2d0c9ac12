"""Writes the bundled evaluation set: eval/choice.parquet (multiple choice) and eval/short.parquet (short answer).

Rerun from the repository root (deterministic, no network): `python batchgen/data/make_eval_set.py`.

Both files share one schema, so a job can read either or both (`{batchgen_data}/eval/*.parquet`):
  id (string), kind ("choice" | "short"), question (the context, ending in "Answer:"), choices (4 strings, each
  with its leading space, as a continuation of the question), answer (index of the right choice), answer_text
  (the right answer alone, for exact match on generated text), topic.
Items are simple facts a small instruction model may or may not know (capitals, arithmetic, opposites, animals,
colours, sequences), written here from small tables; the distractors are drawn from the same table, seeded.
"""

from __future__ import annotations

import pathlib
import random

import pyarrow as pa
import pyarrow.parquet as pq

OUT = pathlib.Path(__file__).resolve().parent / "eval"

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Australia", "Canberra"), ("Kenya", "Nairobi"), ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Turkey", "Ankara"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("South Korea", "Seoul"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Nigeria", "Abuja"), ("Colombia", "Bogota"),
    ("Switzerland", "Bern"), ("Czech Republic", "Prague"), ("Ukraine", "Kyiv"), ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"), ("Morocco", "Rabat"), ("Ethiopia", "Addis Ababa"), ("New Zealand", "Wellington"),
    ("Scotland", "Edinburgh"), ("England", "London"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
]  # fmt: skip
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"), ("happy", "sad"),
    ("old", "young"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("wet", "dry"),
    ("high", "low"), ("rich", "poor"), ("strong", "weak"), ("long", "short"), ("thick", "thin"), ("loud", "quiet"),
    ("clean", "dirty"), ("heavy", "light"), ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("inside", "outside"),
    ("first", "last"), ("day", "night"), ("north", "south"), ("east", "west"), ("left", "right"), ("true", "false"),
]  # fmt: skip
ANIMAL_SOUNDS = [
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"), ("pig", "oink"),
    ("owl", "hoot"), ("snake", "hiss"), ("lion", "roar"), ("horse", "neigh"), ("bee", "buzz"), ("frog", "croak"),
]  # fmt: skip
ANIMAL_YOUNG = [
    ("dog", "puppy"), ("cat", "kitten"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"), ("goat", "kid"),
    ("frog", "tadpole"), ("bear", "cub"), ("duck", "duckling"), ("kangaroo", "joey"), ("swan", "cygnet"),
    ("pig", "piglet"),
]  # fmt: skip
COLOURS = [
    ("a banana", "yellow"), ("grass", "green"), ("the sky on a clear day", "blue"), ("snow", "white"),
    ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a carrot", "orange"),
    ("chocolate", "brown"), ("a lemon", "yellow"), ("blood", "red"), ("milk", "white"), ("a lime", "green"),
    ("an eggplant", "purple"), ("the sun in a drawing", "yellow"),
]  # fmt: skip
COLOUR_NAMES = ["red", "green", "blue", "yellow", "white", "black", "orange", "brown", "purple", "pink"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip


def _choices(rng: random.Random, right: str, pool: list[str]) -> tuple[list[str], int]:
    wrong = rng.sample(sorted({p for p in pool if p != right}), 3)
    options = wrong + [right]
    rng.shuffle(options)
    return [" " + o for o in options], options.index(right)


def _items(rng: random.Random) -> list[dict]:
    items: list[dict] = []

    def add(topic: str, question: str, right: str, pool: list[str]) -> None:
        choices, answer = _choices(rng, right, pool)
        items.append(dict(topic=topic, question=f"Question: {question}\nAnswer:", choices=choices, answer=answer,
                          answer_text=right))  # fmt: skip

    capitals = [c for _, c in CAPITALS]
    for country, capital in CAPITALS:
        add("capitals", f"What is the capital of {country}?", capital, capitals)
    words = sorted({w for pair in OPPOSITES for w in pair})
    for a, b in OPPOSITES:
        add("opposites", f"What is the opposite of '{a}'?", b, words)
        add("opposites", f"What is the opposite of '{b}'?", a, words)
    sounds = [s for _, s in ANIMAL_SOUNDS]
    for animal, sound in ANIMAL_SOUNDS:
        add("animals", f"What sound does a {animal} make?", sound, sounds)
    young = [y for _, y in ANIMAL_YOUNG]
    for animal, baby in ANIMAL_YOUNG:
        add("animals", f"What is a baby {animal} called?", baby, young)
    for thing, colour in COLOURS:
        add("colours", f"What colour is {thing}?", colour, COLOUR_NAMES)
    for i, day in enumerate(DAYS):
        add("sequences", f"Which day comes after {day}?", DAYS[(i + 1) % 7], DAYS)
        add("sequences", f"Which day comes before {day}?", DAYS[i - 1], DAYS)
    for i, month in enumerate(MONTHS):
        add("sequences", f"Which month comes after {month}?", MONTHS[(i + 1) % 12], MONTHS)
    for _ in range(130):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        op = rng.choice(["plus", "minus", "times"])
        right = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        near = sorted({right + d for d in (-10, -2, -1, 1, 2, 10)})
        add("arithmetic", f"What is {a} {op} {b}?", str(right), [str(n) for n in near])
    return items


def main() -> None:
    rng = random.Random(2024)
    items = _items(rng)
    rng.shuffle(items)
    # About a third as short-answer items: the same shape, for exact match on generated answers as well.
    short, choice = items[: len(items) // 3], items[len(items) // 3 :]
    OUT.mkdir(exist_ok=True)
    for name, rows, kind in (("choice", choice, "choice"), ("short", short, "short")):
        table = pa.table({
            "id": [f"{kind}-{i:04d}" for i in range(len(rows))],
            "kind": [kind] * len(rows),
            "question": [r["question"] for r in rows],
            "choices": pa.array([r["choices"] for r in rows], pa.list_(pa.string())),
            "answer": pa.array([r["answer"] for r in rows], pa.int32()),
            "answer_text": [r["answer_text"] for r in rows],
            "topic": [r["topic"] for r in rows],
        })  # fmt: skip
        pq.write_table(table, OUT / f"{name}.parquet", row_group_size=64)
        print(f"{OUT / name}.parquet: {len(rows)} items")


if __name__ == "__main__":
    main()

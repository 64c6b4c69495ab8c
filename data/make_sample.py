"""Build the bundled sample data from the UCI Adult census files.

Writes:

* ``persona.csv.gz``: all 48,842 Adult rows (adult.data, then adult.test, in
  their original order) with synthetic ``name``, ``email`` and ``collected_at``
  columns added, and a ``split`` column (``train`` / ``test``).
* ``persona_new.csv``: a few rows from adult.test with fresh synthetic
  identities, no ``income`` and no ``split``, to score with ``predict``.

The census columns are kept as they are (whitespace trimmed, ``?`` -> empty,
test labels without their trailing dot). Names, emails and timestamps are
synthetic and drawn with fixed seeds, and the gzip header carries no file name
and mtime 0, so running the script twice gives byte-identical files.

Usage (from the repository root)::

    .venv/bin/python data/make_sample.py --adult-dir /work/shared/data/adult \\
        --out data/persona.csv.gz --new-out data/persona_new.csv --new-rows 200
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import random
import unicodedata
from datetime import UTC, datetime
from pathlib import Path

ADULT_COLUMNS = [
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education_num",
    "marital_status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital_gain",
    "capital_loss",
    "hours_per_week",
    "native_country",
    "income",
]
COLUMNS = ["name", "email", *ADULT_COLUMNS, "collected_at", "split"]
NEW_COLUMNS = [c for c in COLUMNS if c not in ("income", "split")]
INCOME_VALUES = ("<=50K", ">50K")

SEED = 1994  # the census year; persona_new.csv uses SEED + 1
DOMAINS = ["example.com", "example.org", "example.net"]
# Email numbers: 6 digits for persona.csv.gz, 7 digits for persona_new.csv,
# so the two files can never share an email address.
MAIN_ID_RANGE = (100_000, 1_000_000)
NEW_ID_RANGE = (1_000_000, 10_000_000)
MAIN_PERIOD = ("2024-01-01T00:00:00", "2025-12-31T23:59:59")
NEW_PERIOD = ("2026-01-01T00:00:00", "2026-06-30T23:59:59")

# fmt: off
GIVEN_FEMALE = [
    "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Susan", "Sarah",
    "Emily", "Grace", "Jessica", "Ashley", "Zoë", "Siobhán", "Saoirse",
    "Niamh", "Anne-Marie", "Marie-Claire", "María", "Lucía", "Chloé", "Amélie",
    "Renée", "Hélène", "Małgorzata", "Agnieszka", "Ingrid", "Astrid", "Åsa",
    "Dagný", "Yuki", "Keiko", "Mei", "Xiaoling", "Ngọc", "Thảo", "Priya",
    "Ananya", "Fatima", "Aisha", "Ayşe", "Zeynep", "Olga", "Chiara", "Giulia",
    "Ana", "Leilani", "Nomvula", "Ama", "Chidinma", "Hana",
]
GIVEN_MALE = [
    "James", "John", "Robert", "Michael", "William", "David", "Daniel",
    "Christopher", "Matthew", "Anthony", "Kevin", "José", "Andrés", "Tomás",
    "Mateo", "Sergio", "Łukasz", "Piotr", "Wojciech", "Søren", "Björn",
    "Lars", "Ólafur", "Jürgen", "François", "Jean-Luc", "Jean-Pierre", "Seán",
    "Oisín", "Mohammed", "Ahmed", "Ömer", "Mehmet", "Ravi", "Arjun", "Wei",
    "Hiroshi", "Kenji", "Minh", "Đức", "Kwame", "Chinedu", "Emeka", "Nikolai",
    "Dmitri", "Luca", "Giovanni", "João", "Kai", "Noah",
]
FAMILY = [
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis",
    "Wilson", "Anderson", "Taylor", "Moore", "Jackson", "Martin", "Thompson",
    "García", "Rodríguez", "Martínez", "Hernández", "López", "González",
    "García-Márquez", "de la Cruz", "O'Brien", "O'Connor", "McCarthy",
    "MacDonald", "Smith-Jones", "Hughes-Morgan", "Nguyễn", "Trần", "Lê",
    "Phạm", "Ōtsuka", "Satō", "Suzuki", "Takahashi", "Kim", "Park", "Chen",
    "Wang", "Li", "Zhang", "Patel", "Sharma", "Singh", "Khan", "Ali",
    "Kowalski", "Nowak", "Wiśniewski", "Wójcik", "Søndergaard", "Jørgensen",
    "Andersen", "Müller", "Schröder", "Weiß", "van der Berg", "Dubois",
    "Lefèvre", "Moreau", "Rossi", "Bianchi", "Esposito", "Silva", "Santos",
    "Gonçalves", "Okafor", "Mensah", "Adeyemi", "Yılmaz", "Öztürk", "Ivanov",
]

# Letters that Unicode normalisation does not split into ASCII + accent.
ASCII_EXTRA = str.maketrans(
    {"ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "đ": "d", "Đ": "D", "ß": "ss",
     "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "þ": "th", "ð": "d",
     "ı": "i"}
)
# fmt: on


def ascii_fold(text: str) -> str:
    """'Łukasz Wiśniewski' -> 'Lukasz Wisniewski'."""
    decomposed = unicodedata.normalize("NFKD", text.translate(ASCII_EXTRA))
    return "".join(ch for ch in decomposed if ch.isascii())


def email_part(text: str) -> str:
    """Lower-case ASCII letters, digits and hyphens only: "O'Brien" -> 'obrien'."""
    folded = ascii_fold(text).lower()
    return "".join(ch for ch in folded if ch.isalnum() or ch == "-")


def pick(rng: random.Random, items: list[str]) -> str:
    # Only rng.random() is used: Python guarantees its sequence for a given
    # seed across versions (unlike choice/randrange/sample).
    return items[int(rng.random() * len(items))]


def unique_ids(rng: random.Random, count: int, lo: int, hi: int) -> list[int]:
    """`count` distinct integers from [lo, hi), in random order."""
    ids: list[int] = []
    seen: set[int] = set()
    while len(ids) < count:
        n = lo + int(rng.random() * (hi - lo))
        if n not in seen:
            seen.add(n)
            ids.append(n)
    return ids


def timestamp(rng: random.Random, period: tuple[str, str]) -> str:
    start, end = (
        int(datetime.fromisoformat(t).replace(tzinfo=UTC).timestamp()) for t in period
    )
    seconds = start + int(rng.random() * (end - start + 1))
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def identity(
    rng: random.Random, sex: str, number: int, period: tuple[str, str]
) -> dict[str, str]:
    """A synthetic name, email and collection time for one person."""
    given_names = {"Female": GIVEN_FEMALE, "Male": GIVEN_MALE}.get(
        sex, GIVEN_FEMALE + GIVEN_MALE
    )
    given = pick(rng, given_names)
    family = pick(rng, FAMILY)
    domain = pick(rng, DOMAINS)
    local = f"{email_part(given)}.{email_part(family)}.{number}"
    return {
        "name": f"{given} {family}",
        "email": f"{local}@{domain}",
        "collected_at": timestamp(rng, period),
    }


def read_adult(path: Path) -> list[dict[str, str]]:
    """Parse adult.data / adult.test: skip blank and '|' comment lines."""
    rows = []
    for line_no, line in enumerate(path.read_text("ascii").splitlines(), 1):
        if not line.strip() or line.startswith("|"):
            continue
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(ADULT_COLUMNS):
            raise ValueError(f"{path}:{line_no}: expected 15 fields")
        row = {
            c: ("" if v == "?" else v)
            for c, v in zip(ADULT_COLUMNS, values, strict=True)
        }
        row["income"] = row["income"].removesuffix(".")
        if row["income"] not in INCOME_VALUES:
            raise ValueError(f"{path}:{line_no}: bad label {row['income']!r}")
        rows.append(row)
    return rows


def write_csv(handle: io.TextIOBase, columns: list[str], rows: list[dict]) -> None:
    writer = csv.DictWriter(
        handle, fieldnames=columns, lineterminator="\n", extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--adult-dir",
        type=Path,
        required=True,
        help="folder holding adult.data and adult.test",
    )
    parser.add_argument("--out", type=Path, default=Path("data/persona.csv.gz"))
    parser.add_argument("--new-out", type=Path, default=Path("data/persona_new.csv"))
    parser.add_argument("--new-rows", type=int, default=200)
    args = parser.parse_args()
    if not 0 <= args.new_rows <= 16_281:
        parser.error("--new-rows must be between 0 and 16281")

    train = read_adult(args.adult_dir / "adult.data")
    test = read_adult(args.adult_dir / "adult.test")
    for row in train:
        row["split"] = "train"
    for row in test:
        row["split"] = "test"
    rows = train + test

    # persona.csv.gz: every census row, with a synthetic identity.
    rng = random.Random(SEED)
    numbers = unique_ids(rng, len(rows), *MAIN_ID_RANGE)
    for row, number in zip(rows, numbers, strict=True):
        row.update(identity(rng, row["sex"], number, MAIN_PERIOD))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with (
        args.out.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        io.TextIOWrapper(gz, encoding="utf-8", newline="") as text,
    ):
        write_csv(text, COLUMNS, rows)

    # persona_new.csv: some test rows as "new" people with fresh identities.
    new_rng = random.Random(SEED + 1)
    picked = sorted(unique_ids(new_rng, args.new_rows, 0, len(test)))
    new_numbers = unique_ids(new_rng, args.new_rows, *NEW_ID_RANGE)
    new_rows = []
    for index, number in zip(picked, new_numbers, strict=True):
        row = {c: test[index][c] for c in ADULT_COLUMNS if c != "income"}
        row.update(identity(new_rng, row["sex"], number, NEW_PERIOD))
        new_rows.append(row)

    args.new_out.parent.mkdir(parents=True, exist_ok=True)
    with args.new_out.open("w", encoding="utf-8", newline="") as handle:
        write_csv(handle, NEW_COLUMNS, new_rows)

    print(f"{args.out}: {len(rows)} rows ({len(train)} train, {len(test)} test)")
    print(f"{args.new_out}: {len(new_rows)} rows")


if __name__ == "__main__":
    main()

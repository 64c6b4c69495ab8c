"""Build the bundled multi-row sample ``panel.csv.gz`` from ``persona.csv.gz``.

A panel: people observed once a year for 1 to 20 years, so that one person has many
rows (the case person-level DP-SGD is for, docs/training.md "Person level"). The
generative model, all draws from ``random.Random(SEED)``:

* people: ``TRAIN_PEOPLE`` records drawn without replacement from the sample's train
  split and ``TEST_PEOPLE`` from its test split (real census records with synthetic
  names and emails); a person keeps their name, email and split on every row;
* years observed: ``n`` uniform on 1..20; first year uniform on 2000..2026-n+1, one
  row a year (``collected_at`` = 1 June of that year, 12:00 UTC);
* drift: age grows by one a year (at most 90); weekly hours take a random walk
  (steps uniform on -3..3, kept within 1..99); everything else stays the person's;
* target: a person effect ``u ~ N(0, 0.5^2)`` and their census label ``y0`` give
  ``logit = 2 (2 y0 - 1) + u + 0.05 (hours - hours_0) + 0.05 (age - age_0)``; each
  year's ``income`` is ``>50K`` with probability ``sigmoid(logit)``, drawn
  independently. The target depends on the person (``y0``, ``u``) and drifts with the
  year; a person's rows are repeated noisy looks at the same label.

Deterministic: fixed seed, and a gzip header with no file name and mtime 0, so running
it again gives a byte-identical file. Standard library only.

Usage (from the repository root)::

    .venv/bin/python data/make_panel.py --sample data/persona.csv.gz --out data/panel.csv.gz
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import math
import random
from pathlib import Path

SEED = 20261130
TRAIN_PEOPLE = 6000
TEST_PEOPLE = 2000
MAX_YEARS = 20
LAST_YEAR = 2026
FIRST_YEAR = 2000


def _observations(record: dict[str, str], rng: random.Random) -> list[dict[str, str]]:
    years = rng.randint(1, MAX_YEARS)
    start = rng.randint(FIRST_YEAR, LAST_YEAR - years + 1)
    effect = rng.gauss(0.0, 0.5)
    label = 1 if record["income"] == ">50K" else 0
    age0, hours0 = int(record["age"]), int(record["hours_per_week"])
    age, hours = age0, hours0
    rows = []
    for year in range(years):
        if year:
            age = min(90, age + 1)
            hours = max(1, min(99, hours + rng.randint(-3, 3)))
        logit = 2.0 * (2 * label - 1) + effect + 0.05 * (hours - hours0) + 0.05 * (age - age0)
        high = rng.random() < 1.0 / (1.0 + math.exp(-logit))
        row = dict(record)
        row.update(age=str(age), hours_per_week=str(hours),
                   income=">50K" if high else "<=50K",
                   collected_at=f"{start + year}-06-01T12:00:00Z")
        rows.append(row)
    return rows


def build(sample: Path) -> tuple[list[str], list[dict[str, str]]]:
    with gzip.open(sample, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        records = [r for r in reader if r["income"] in ("<=50K", ">50K")]
    rng = random.Random(SEED)
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    people = rng.sample(train, TRAIN_PEOPLE) + rng.sample(test, TEST_PEOPLE)
    rows = [row for person in people for row in _observations(person, rng)]
    return columns, rows


def write(columns: list[str], rows: list[dict[str, str]], out: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                               mtime=0, compresslevel=9) as fh:
        fh.write(text.getvalue().encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=Path, default=Path("data/persona.csv.gz"))
    parser.add_argument("--out", type=Path, default=Path("data/panel.csv.gz"))
    args = parser.parse_args()
    columns, rows = build(args.sample)
    write(columns, rows, args.out)
    people = len({r["email"] for r in rows})
    print(f"{args.out}: {len(rows)} rows, {people} people")


if __name__ == "__main__":
    main()

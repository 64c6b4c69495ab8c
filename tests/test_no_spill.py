"""polars never spills record-level data to disk in a personanet process.

polars' streaming engine writes frames as plain Arrow IPC files when a query outgrows its
memory budget; `personanet/__init__.py` sets a zero disk budget so such a query fails
instead. The test forces the situation (a 1 MB memory budget) in a fresh process and
looks in the spill folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

QUERY = """
import personanet  # first, as the CLI does
import polars as pl
n = 1_000_000
frame = pl.DataFrame({"a": pl.int_range(n, eager=True).shuffle(seed=1),
                      "s": pl.int_range(n, eager=True).cast(pl.String)})
try:
    frame.lazy().sort("a").group_by(pl.col("a") % 1000).agg(pl.col("s").first()) \\
        .collect(engine="streaming")
except pl.exceptions.ComputeError as exc:
    print("refused:", exc)
else:
    print("ran")
"""


def _megabytes_spilled(stderr: str) -> float:
    """What polars' spill metrics say it wrote (it deletes the files at exit)."""
    return sum(float(mb) for mb in re.findall(r"file_mb\(written=([0-9.]+)", stderr))


def _run(tmp_path: Path, *, import_personanet: bool) -> tuple[str, float, list[Path]]:
    spill = tmp_path / ("spill-pn" if import_personanet else "spill-bare")
    spill.mkdir()
    env = {**os.environ, "POLARS_OOC_MEMORY_BUDGET_MB": "1", "POLARS_OOC_SPILL_DIR": str(spill),
           "POLARS_OOC_LOG_METRICS": "1",
           "POLARS_OOC_DISK_BUDGET_MB": "100000"}  # a user's setting does not re-enable it
    code = QUERY if import_personanet else QUERY.replace("import personanet", "pass")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300, check=True)
    files = [p for p in spill.rglob("*") if p.is_file()]
    return result.stdout, _megabytes_spilled(result.stderr), files


def test_a_query_that_would_spill_fails_instead_of_writing_plaintext(tmp_path: Path) -> None:
    out, spilled, files = _run(tmp_path, import_personanet=True)
    assert out.startswith("refused:") and "disk budget" in out, out
    assert spilled == 0 and files == []


def test_without_personanet_the_same_query_spills(tmp_path: Path) -> None:
    """The control: without the setting polars does write the frames out, so the test
    above would fail if personanet stopped setting it."""
    out, spilled, _ = _run(tmp_path, import_personanet=False)
    assert out.strip() == "ran"
    assert spilled > 0

"""The names of the files each stage writes into its artifact: one place, so no stage spells
another's file by hand.

Record-level tables end in ``.enc`` (encrypted, see docs/encryption.md); the rest hold no
record-level data and stay readable, authenticated by the sealed manifest.
"""

from __future__ import annotations

#: collect: the records as text, configured columns only
RECORDS = "records.parquet.enc"
#: collect from a database with a watermark column: the largest value read (a value of a
#: record, so encrypted like one); `collect --incremental` reads only rows past it
WATERMARK = "watermark.parquet.enc"

#: clean: the people held for training and for evaluation, and what was set aside
TRAIN_TABLE = "train.parquet.enc"
TEST_TABLE = "test.parquet.enc"
QUARANTINE = "quarantine.parquet.enc"

#: train: the network (safetensors, no pickle), its description, its encoder, its privacy claim
MODEL_WEIGHTS = "model.safetensors"
MODEL_SPEC = "model.json"
ENCODER = "encoder.json"
PRIVACY = "privacy.json"
#: tune: every trial of the search (settings, DP scores): encrypted, for the key holder only
TUNING_REPORT = "tuning.json.enc"

#: evaluate: the figures and the human-readable report (plots are named by the report)
METRICS = "metrics.json"
REPORT = "report.md"

#: predict: one row per scored input row, one per rejected row
PREDICTIONS = "predictions.csv.enc"
REJECTS = "rejects.csv.enc"

"""Cleaning rules: what a record's values may be, decided from public knowledge only.

A library of the per-row rules, apart from any stage: the clean stage applies them
before it deduplicates, bounds contributions and splits (`personanet.stages.clean`),
and predict applies the very same rules to the records it scores, without the clean
stage's set-level steps. It knows the config and the pseudonym key, never the store:
it reads frames and returns frames.

- `values`: the vocabulary (quarantine reasons, `__other__`, datetime formats) and
  per-value judgements (text folding, bounds, imputed values);
- `columns`: one column's rule as polars expressions;
- `rows`: every rule over a frame at once (`prepare_rows`).
"""

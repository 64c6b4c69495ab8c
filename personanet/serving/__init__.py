"""Serving: a trained model behind an HTTP JSON API (`personanet serve`).

- `scorer`: which model to serve (`select_model`) and `Scorer`, predict's per-row
  scoring for JSON records
- `app`: the Starlette app (`create_app`), its token, limits and access log, and
  `ModelHolder`, the reference a reload swaps
- `server`: `serve`, which loads the model and runs uvicorn; `read_token`

Nothing of the library imports this package; only the CLI does.
"""

"""Privacy: what a dataset may spend, what a run spent, and how gradients are made private.

One module per concept:

- `accounting`: epsilon of DP-SGD from its public parameters (Opacus' accountants), and
  noise calibration for a target epsilon in bounded time.
- `composition`: how the runs of a dataset compose against its budget (DP-SGD runs
  tightly, by PRV over their joined histories; anything else by addition).
- `ledger`: the sealed per-dataset budget ledger (reserve, settle, pin) and the summary
  ``budget show`` prints (drawn by `personanet.reporting.budget`).
- `record`: ``privacy.json``, a trained model's privacy claim.
- `clipping` (+ `clipping_layers`): per-example gradient clipping in one backward pass,
  one handler per layer type.
- `audit`: the empirical membership-inference audit; `pseudonym`: keyed pseudonyms.

The names most callers need are re-exported here; none of these imports torch or opacus
until it is used.
"""

from personanet.privacy.accounting import (
    ACCOUNTANTS,
    PRV_MAX_POINTS,
    AccountantError,
    calibrate_noise,
    compute_epsilon,
    epsilon_of_history,
    noise_for_epsilon,
    prv_grid_points,
    rdp_bound,
)
from personanet.privacy.clipping import BookkeepingClipper, UnsupportedLayerError
from personanet.privacy.ledger import Ledger, budget_summary
from personanet.privacy.record import PrivacyRecord

__all__ = [
    "ACCOUNTANTS", "PRV_MAX_POINTS", "AccountantError", "BookkeepingClipper", "Ledger",
    "PrivacyRecord", "UnsupportedLayerError", "budget_summary", "calibrate_noise",
    "compute_epsilon", "epsilon_of_history", "noise_for_epsilon", "prv_grid_points", "rdp_bound",
]

"""PersonaNet: train models on personal records under differential privacy."""

import os as _os

__version__ = "0.1.0"

# polars' streaming engine spills frames to disk as plain Arrow IPC files when a query
# outgrows its memory budget (`POLARS_OOC_*`, into a temporary folder). A spilled frame
# is plaintext record-level data on disk, which personanet never writes: a zero disk
# budget makes such a query fail instead. Set before polars is first imported, and
# whatever the environment says.
_os.environ["POLARS_OOC_DISK_BUDGET_MB"] = "0"

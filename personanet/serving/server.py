"""The server: load the gated model, then run the app under uvicorn until stopped.

`serve` is what `personanet serve` calls: the key check and model choice of
`scorer.select_model`, the bearer token from a file or the environment, and
uvicorn on the loopback address unless told otherwise, with its own access log
off (it would print client addresses and query strings; the app logs its own).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from personanet.config import Config
from personanet.errors import KeyAccessError, UsageError
from personanet.serving.app import Limits, ModelHolder, create_app
from personanet.serving.scorer import Scorer, select_model
from personanet.store.artifacts import ArtifactStore
from personanet.store.keys import MasterKey

log = logging.getLogger("personanet")

TOKEN_ENV = "PERSONANET_SERVE_TOKEN"  # noqa: S105 - a variable name, not a token
#: shorter tokens are guessable; `openssl rand -hex 32` gives 64 characters
MIN_TOKEN_LENGTH = 16


def read_token(token_file: Path | None) -> str:
    """The bearer token from `token_file`, else $PERSONANET_SERVE_TOKEN (exit 2 without one
    or with a short one, 77 for an unreadable file)."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise KeyAccessError(f"cannot read --token-file {token_file}: {exc.strerror}") \
                from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UsageError(f"serve needs a bearer token: --token-file PATH or {TOKEN_ENV}")
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise UsageError(f"the serve token must be at least {MIN_TOKEN_LENGTH} characters "
                         "without spaces (`openssl rand -hex 32`)")
    return token


def serve(config: Config, store: ArtifactStore, key: MasterKey, *, token: str,
          model_version: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          allow_no_dp: bool = False, limits: Limits = Limits(),
          watch_seconds: float | None = None) -> None:
    """Serve the config chain's gated model (or `model_version`) until interrupted.

    SIGHUP reloads, and so does every `watch_seconds` (the `--watch` poll): the choice
    is made again (a pinned version stays the same) and a newer model replaces the
    served one once loaded; requests in flight finish on the old one.
    """
    import uvicorn

    served: list[str] = []

    def load() -> Scorer | None:
        artifact, info = select_model(config, store, key, version=model_version,
                                      allow_no_dp=allow_no_dp)
        if info.version in served[-1:]:
            return None  # the same model: nothing to load
        scorer = Scorer(config, artifact, info, key)
        served.append(info.version)
        return scorer

    scorer = load()
    assert scorer is not None
    if not scorer.info.private:
        log.warning("serve: model %s was trained without differential privacy (--no-dp): "
                    "its scores carry no privacy guarantee", scorer.info.version)
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serve: listening on %s, beyond this machine: put TLS in front", host)
    holder = ModelHolder(scorer, load)
    app = create_app(holder, token, limits=limits, reload_on_sighup=True,
                     watch_seconds=watch_seconds)
    log.info("serve: model %s on http://%s:%d", scorer.info.version, host, port)
    uvicorn.run(app, host=host, port=port, access_log=False, log_config=None,
                server_header=False, date_header=False)

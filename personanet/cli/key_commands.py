"""`personanet keys ...`: create a master key, and rotate every data key to a new one.

A key never appears on the command line: it is read from a file
(PERSONANET_KEY_FILE, `--new-key-file`) or the environment.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

from personanet.cli import context

log = logging.getLogger("personanet")

app = typer.Typer(help="Create and rotate master keys.", no_args_is_help=True)


@app.command("generate")
def keys_generate(path: Path = typer.Argument(..., help="Where to write the new key (0600).")
                  ) -> None:
    """Write a new random master key to PATH, readable by you only.

    Example:

        personanet keys generate ~/.config/personanet/master.key
    """
    from personanet.store.keys import MasterKey, write_key_file

    key = MasterKey.generate()
    write_key_file(path, key)
    if context.options.json:
        sys.stdout.write(json.dumps({"stage": "keys", "path": str(path),
                                     "key_id": key.key_id}) + "\n")
    else:
        sys.stdout.write(f"wrote key {key.key_id} to {path}\n")
        log.info("export PERSONANET_KEY_FILE=%s", path)


@app.command("rotate")
def keys_rotate(
    new_key_file: Path = typer.Option(..., "--new-key-file", envvar="PERSONANET_NEW_KEY_FILE",
                                      help="Key file made by `keys generate` (the key itself "
                                           "never goes on the command line)."),
) -> None:
    """Re-wrap every data key under a new master key (payloads are not rewritten).

    The current key comes from PERSONANET_KEY_FILE / PERSONANET_KEY as usual. Safe to
    re-run after an interruption: files already under the new key are skipped.

    Example:

        personanet keys generate new.key

        personanet keys rotate --new-key-file new.key

        export PERSONANET_KEY_FILE=new.key
    """
    from dataclasses import asdict

    from personanet.stages.housekeeping import rotate
    from personanet.store.keys import load_master_key

    new = load_master_key({"PERSONANET_KEY_FILE": str(new_key_file)})
    report = rotate(context.options.artifacts, context.load_key(), new,
                    lock_timeout=context.options.lock_timeout)
    if context.options.json:
        sys.stdout.write(json.dumps({"stage": "keys", **asdict(report)}) + "\n")
    else:
        sys.stdout.write(f"rotated {report.files_rewrapped} files from key {report.old_key_id} "
                         f"to {report.new_key_id} ({report.files_already_rotated} already "
                         "rotated)\n")
        log.info("now use the new key: export PERSONANET_KEY_FILE=%s", new_key_file)

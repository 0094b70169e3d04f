"""`shipmon secrets`: moving the stored secrets to a new SHIPMON_SECRET_KEY."""

from __future__ import annotations

import typer

from worker.cli.common import console, fail, servers, settings

secrets_app = typer.Typer(help="Manage the key that encrypts stored secrets.", no_args_is_help=True)


@secrets_app.command("rotate")
def secrets_rotate() -> None:
    """Re-encrypt every stored API key and webhook secret with SHIPMON_SECRET_KEY.

    Set SHIPMON_SECRET_KEY to the new key and SHIPMON_OLD_SECRET_KEYS to the old one(s), for
    this command and for every worker; once it has finished, the old keys can go. Safe to run
    again, and to run while workers run.
    """
    from worker.core.db import session_factory
    from worker.ops.rotation import UnreadableSecret, rotate_stored_secrets

    old_keys = [k.get_secret_value() for k in settings().old_secret_keys]
    if not old_keys:
        fail(
            "set SHIPMON_OLD_SECRET_KEYS to the key(s) the secrets are stored with now, and "
            "SHIPMON_SECRET_KEY to the new key"
        )
    found = servers()
    try:
        rotated = rotate_stored_secrets(
            session_factory(found.database_url), found.secret_key, old_keys
        )
    except UnreadableSecret as exc:
        fail(str(exc))
    console.print(
        f"{rotated.reencrypted} secret(s) re-encrypted with SHIPMON_SECRET_KEY, "
        f"{rotated.already_current} already were; SHIPMON_OLD_SECRET_KEYS can now be removed"
    )

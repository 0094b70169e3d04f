"""`shipmon token`: bearer tokens for the HTTP API, one account each."""

from __future__ import annotations

from typing import Annotated

import typer

from worker.cli.common import console, fail, print_json, print_table, session, uncut_table

token_app = typer.Typer(help="Manage HTTP API tokens.", no_args_is_help=True)


@token_app.command("create")
def token_create(
    account: Annotated[str, typer.Argument(help="The account the token acts for.")],
    name: Annotated[str, typer.Option(help="A label, e.g. the backend that uses it.")] = "api",
) -> None:
    """Create a token and print it once, alone on the last line (only its hash is stored)."""
    from worker.api.tokens import MAX_NAME_LENGTH, create_token

    if not name.isprintable() or not 0 < len(name) <= MAX_NAME_LENGTH:
        fail(f"--name must be 1-{MAX_NAME_LENGTH} printable characters")
    with session() as s:
        row, token = create_token(s, account, name)
        token_id = row.id
    console.print(
        f"token {token_id} ({name}) for account [bold]{account}[/]; it is shown only now:",
        highlight=False,
    )
    # Plain print: scripts capture the last line, and rich must not wrap or colour it.
    print(token)


@token_app.command("list")
def token_list(
    account: Annotated[str, typer.Argument(help="The account's name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """List an account's tokens: id, label, when created and revoked (never the token)."""
    from worker.api.tokens import list_tokens

    with session() as s:
        tokens = list_tokens(s, account)
    rows = [
        {
            "id": t.id,
            "name": t.name,
            "created_at": t.created_at.isoformat(),
            "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
        }
        for t in tokens
    ]
    if as_json:
        print_json(rows)
        return
    table = uncut_table("id", "name", "created", "revoked", whole=("id", "created", "revoked"))
    for r in rows:
        table.add_row(
            str(r["id"]), str(r["name"]), str(r["created_at"]), str(r["revoked_at"] or "")
        )
    print_table(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[int, typer.Argument(help="The id `token list` shows.")],
) -> None:
    """Revoke a token; requests with it are refused from now on."""
    from worker.api.tokens import TokenNotFound, revoke_token

    try:
        with session() as s:
            revoke_token(s, token_id)
    except TokenNotFound as exc:
        fail(str(exc))
    console.print(f"token {token_id} revoked")

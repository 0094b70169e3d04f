"""The `shipmon` command line.

Command modules import their heavy dependencies inside the commands (see `worker.cli.common`),
so `shipmon --help` and `shipmon --version` answer at once.
"""

from __future__ import annotations

import atexit
import gc
import inspect
from typing import Annotated

import typer

from worker.cli.accounts import account_app, db_app
from worker.cli.api import api
from worker.cli.intake import track, untrack
from worker.cli.notifications import email_app, endpoint_app, webhooks_app
from worker.cli.ops import metrics, show, stats
from worker.cli.quota import quota
from worker.cli.run import demo, run, sandbox
from worker.cli.secret_keys import secrets_app
from worker.cli.tokens import token_app

app = typer.Typer(
    name="shipmon",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold API keys and secrets
)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        typer.echo(f"shipmon {version('shipmon')}")
        raise typer.Exit


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Monitor 247Express shipments: poll within quota, record changes, notify merchants."""


app.add_typer(db_app, name="db")
app.add_typer(account_app, name="account")
app.command()(track)
app.command()(untrack)
app.command()(quota)
app.command()(show)
app.command()(stats)
app.command()(metrics)
app.add_typer(endpoint_app, name="endpoint")
app.add_typer(email_app, name="email")
app.add_typer(webhooks_app, name="webhooks")
app.add_typer(secrets_app, name="secrets")
app.add_typer(token_app, name="token")
app.command()(run)
app.command()(sandbox)
app.command()(demo)
app.command()(api)


def _reflow(text: str) -> str:
    """A docstring's paragraphs each on one line, for rich to wrap at the terminal's width."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)


def _reflow_help(typer_app: typer.Typer) -> None:
    """Help from docstrings without their source's line breaks (rich keeps every newline)."""
    for command in typer_app.registered_commands:
        if command.help is None and command.callback is not None and command.callback.__doc__:
            command.help = _reflow(command.callback.__doc__)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


_reflow_help(app)


def main() -> None:
    # At exit the interpreter's last collection walks every object the imports made (SQLAlchemy,
    # psycopg, pydantic): a quarter of a second on a short command. Frozen objects are skipped,
    # and nothing needs collecting once the command is done.
    atexit.register(gc.freeze)
    app()

"""`shipmon track`: register order codes from arguments, a file, or standard input."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from worker.cli.common import err_console, fail, print_json, session


def _read_codes(codes: list[str], file: Path | None) -> list[str]:
    if file is not None and codes:
        fail("give order codes either as arguments or with --file, not both")
    if file is None and codes != ["-"]:
        return codes
    try:
        text = sys.stdin.read() if file is None or str(file) == "-" else file.read_text()
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    # One code per line (commas too); blank lines are skipped, surrounding spaces trimmed.
    return [c.strip() for line in text.splitlines() for c in line.split(",") if c.strip()]


def track(
    account: Annotated[str, typer.Option("--account", help="The account the orders belong to.")],
    order_codes: Annotated[
        list[str] | None, typer.Argument(help="Order codes, or '-' to read them from stdin.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="A file with one order code per line.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Register order codes for monitoring; the scheduler plans each one's first lookup.

    Refused codes are printed one per line with the carrier's error code; registering a code
    twice is harmless. Exits with status 1 if any code was refused.
    """
    from worker.tracking.intake import register_orders

    codes = _read_codes(order_codes or [], file)
    if not codes:
        fail("no order codes given; pass them as arguments, with --file PATH, or '-' for stdin")
    with session() as s:
        result = register_orders(s, account, codes)
    if as_json:
        print_json(result.as_dict())
    else:
        for refusal in result.refused:
            # repr() shows spaces, control characters and quotes exactly as they arrived.
            sys.stdout.write(f"{refusal.order_code!r}\t{refusal.error.value}\n")
        err_console.print(
            f"{len(result.registered)} registered, {len(result.already_registered)} already "
            f"registered, {len(result.refused)} refused",
            highlight=False,
        )
    if result.refused:
        raise typer.Exit(1)


def untrack(
    order_codes: Annotated[list[str], typer.Argument(help="Order codes to stop tracking.")],
    account: Annotated[
        str | None, typer.Option(help="The account, when a code is in several.")
    ] = None,
) -> None:
    """Stop tracking shipments: polling ends and `shipment.polling_stopped` goes out, with
    reason `stopped_by_merchant` (as `DELETE /v1/shipments/CODE` does)."""
    from worker.ops.views import ShipmentNotFound, stop_tracking

    with session() as s:
        try:
            for code in order_codes:
                stop_tracking(s, code, account, datetime.now(UTC))
        except ShipmentNotFound as exc:
            fail(str(exc), code=1)
    err_console.print(f"{len(order_codes)} no longer tracked", highlight=False)

"""The event data: what an outbox event says about its shipment, typed once for every reader.

The tracking code writes it, the outbox stores it as JSON, webhooks send that JSON as the body's
`data` and emails, metrics and the demo read it back. `to_json` is the wire format receivers rely
on (SPEC §3); `from_json` reads what the outbox stored, including rows written before `source`
existed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime
from typing import Any, Literal, cast

from worker.core.clock import iso_utc
from worker.domain.vocabulary import Status

Source = Literal["poll", "push"]
"""How shipmon heard of the change: its own lookup, or the carrier's status push."""


def jsonable(value: Any) -> Any:
    """Dataclasses, lists and dicts as JSON values, with datetimes as `iso_utc` gives them."""
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return iso_utc(value)
    return value


def _moment(value: object) -> datetime | None:
    return datetime.fromisoformat(str(value)) if value is not None else None


def _fields(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"event data: {what} must be a JSON object, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class StatusView:
    """A status as events tell it: the English name, the carrier's ID and its code."""

    name: str | None
    id: int | None
    code: str | None

    @classmethod
    def of(cls, status: Status) -> StatusView:
        return cls(status.value, status.carrier_id, status.code)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "code": self.code}

    @classmethod
    def from_json(cls, value: object) -> StatusView:
        fields = _fields(value, "a status")
        return cls(fields.get("name"), fields.get("id"), fields.get("code"))


@dataclass(frozen=True)
class CurrentStatus(StatusView):
    """The status an event announces, with the carrier's own words for it."""

    tracking_name: str | None

    def to_json(self) -> dict[str, Any]:
        return super().to_json() | {"tracking_name": self.tracking_name}

    @classmethod
    def from_json(cls, value: object) -> CurrentStatus:
        fields = _fields(value, "the status")
        return cls(
            fields.get("name"), fields.get("id"), fields.get("code"), fields.get("tracking_name")
        )


@dataclass(frozen=True)
class DelayView:
    """The carrier's delay code, its text and the courier's note."""

    code: int | None
    reason: str | None
    note: str | None

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "reason": self.reason, "note": self.note}

    @classmethod
    def from_json(cls, value: object) -> DelayView:
        fields = _fields(value, "the delay")
        code = fields.get("code")
        return cls(
            int(code) if code is not None else None, fields.get("reason"), fields.get("note")
        )


@dataclass(frozen=True)
class ScanView:
    """One scan of a `shipment.tracking_event`: where the parcel was seen, and when."""

    status_id: int | None
    status_name: str | None
    post_office_id: str | None
    post_office_name: str | None
    province_id: str | None
    province_name: str | None
    time: datetime | None
    notes: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "status_id": self.status_id,
            "status_name": self.status_name,
            "post_office_id": self.post_office_id,
            "post_office_name": self.post_office_name,
            "province_id": self.province_id,
            "province_name": self.province_name,
            "time": iso_utc(self.time),
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, value: object) -> ScanView:
        f = _fields(value, "the scan")
        return cls(
            f.get("status_id"), f.get("status_name"), f.get("post_office_id"),
            f.get("post_office_name"), f.get("province_id"), f.get("province_name"),
            _moment(f.get("time")), f.get("notes"),
        )  # fmt: skip


@dataclass(frozen=True)
class StallView:
    """Why a `shipment.stalled` event says so: the last change and the stay judged normal."""

    last_change_at: datetime | None
    limit_hours: float
    normal_hours: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "last_change_at": iso_utc(self.last_change_at),
            "limit_hours": self.limit_hours,
            "normal_hours": self.normal_hours,
        }

    @classmethod
    def from_json(cls, value: object) -> StallView:
        f = _fields(value, "the stall")
        normal = f.get("normal_hours")
        return cls(
            _moment(f.get("last_change_at")),
            float(f["limit_hours"]),
            float(normal) if normal is not None else None,
        )


@dataclass(frozen=True)
class EventData:
    """Everything one event says; `reason`, `scan` and `stalled` only in the types with them."""

    order_code: str
    account: str
    sequence: int
    status: CurrentStatus
    event_time: datetime | None
    seen_at: datetime
    previous_status: StatusView | None = None
    delay: DelayView | None = None
    # Why polling stopped (`shipment.not_found`, `shipment.polling_stopped`).
    reason: str | None = None
    scan: ScanView | None = None
    stalled: StallView | None = None
    source: Source = "poll"

    def to_json(self) -> dict[str, Any]:
        """The `data` of the webhook body, as stored in the outbox."""
        data: dict[str, Any] = {
            "order_code": self.order_code,
            "account": self.account,
            "sequence": self.sequence,
            "previous_status": self.previous_status.to_json() if self.previous_status else None,
            "status": self.status.to_json(),
            "event_time": iso_utc(self.event_time),
            "seen_at": iso_utc(self.seen_at),
            "delay": self.delay.to_json() if self.delay else None,
            "source": self.source,
        }
        if self.reason is not None:
            data["reason"] = self.reason
        if self.scan is not None:
            data["scan"] = self.scan.to_json()
        if self.stalled is not None:
            data["stalled"] = self.stalled.to_json()
        return data

    @classmethod
    def from_json(cls, value: object) -> EventData:
        """Read an event's stored data back; ValueError says which part is not as written."""
        data = _fields(value, "the event data")
        try:
            source = data.get("source", "poll")
            if source not in ("poll", "push"):
                raise ValueError(f"event data: source must be 'poll' or 'push', not {source!r}")
            previous, delay = data["previous_status"], data["delay"]
            scan, stalled = data.get("scan"), data.get("stalled")
            seen_at = _moment(data["seen_at"])
            if seen_at is None:
                raise ValueError("event data: seen_at is missing")
            return cls(
                order_code=str(data["order_code"]),
                account=str(data["account"]),
                sequence=int(data["sequence"]),
                status=CurrentStatus.from_json(data["status"]),
                event_time=_moment(data["event_time"]),
                seen_at=seen_at,
                previous_status=StatusView.from_json(previous) if previous is not None else None,
                delay=DelayView.from_json(delay) if delay is not None else None,
                reason=data.get("reason"),
                scan=ScanView.from_json(scan) if scan is not None else None,
                stalled=StallView.from_json(stalled) if stalled is not None else None,
                source=cast(Source, source),
            )
        except KeyError as missing:
            raise ValueError(f"event data: {missing.args[0]!r} is missing") from None

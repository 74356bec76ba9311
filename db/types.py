"""Column types that mean the same on SQLite and PostgreSQL: tz-aware UTC times and 64-bit integers."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Integer
from sqlalchemy.types import DateTime, Enum, TypeDecorator, TypeEngine

# SQLite's INTEGER is already 64-bit (and only "INTEGER PRIMARY KEY" is the rowid); PostgreSQL's is 32-bit,
# too small for byte counts of 2 GiB and nanosecond mtimes.
Int64 = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Tz-aware UTC datetimes: TIMESTAMPTZ on PostgreSQL (leases are judged by the database's clock), and a
    naive UTC text on SQLite, which has no time zones."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> TypeEngine[Any]:
        described: TypeEngine[Any] = dialect.type_descriptor(DateTime(timezone=dialect.name == "postgresql"))
        return described

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass tz-aware UTC times")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)


def state_column(states: type[enum.StrEnum]) -> Enum:
    """A state enum stored as its value in a VARCHAR(16) (no native enum type: new states need no DDL)."""
    return Enum(states, native_enum=False, length=16, create_constraint=False,
                values_callable=lambda members: [member.value for member in members], validate_strings=True)

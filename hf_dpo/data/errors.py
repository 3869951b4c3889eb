"""The error a data row raises, and which of its codes mean "skip it" rather than "stop"."""

from __future__ import annotations

from typing import Optional


class DataError(ValueError):
    """A row that cannot be trained on; the message names source, line, field and reason."""

    def __init__(
        self,
        reason: str,
        *,
        field: str = "",
        source: str = "",
        line: Optional[int] = None,
        code: str = "invalid",
        unit: str = "line",
    ):
        self.reason, self.field, self.source, self.line, self.code = reason, field, source, line, code
        self.unit = unit
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.source}:{place(self.line, self.unit)}" if self.line is not None else self.source
        parts = [p for p in (where, self.field) if p]
        return ": ".join(parts + [self.reason])

    def at(self, source: str, line: int, unit: str = "line") -> DataError:
        """The same error, placed at ``source:line`` (``source:item N`` for the N-th row of a JSON array)."""
        return DataError(self.reason, field=self.field, source=source, line=line, code=self.code, unit=unit)


def place(number: int, unit: str = "line") -> str:
    """``"12"`` for a physical line, ``"item 12"`` for the 12th row of a JSON array (which has no useful lines)."""
    return f"item {number}" if unit == "item" else str(number)


# Identical answers are well-formed but untrainable (the pair only ever gives ln 2
# and no gradient), so they are skipped and counted even when bad rows raise.
UNTRAINABLE = frozenset({"identical_responses"})

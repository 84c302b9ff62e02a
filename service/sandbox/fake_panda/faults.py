"""The faults a test can inject into a fake PANDA, as one value, and how a JSON update reads.

Pure: `updated(faults, changes)` validates a `PUT /_fake/faults` body; `control` applies it.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Faults:
    """Injected misbehaviour; the defaults are a healthy PANDA.

    `latency_s` delays every /api/ answer; `error_rate` (0..1) is the share of row writes
    answered 500; `locked` slugs refuse row writes with 403; a row write naming one of
    `refuse_ids` gets a 400; `hang` holds /api/ requests until cleared; `down` answers every
    /api/ request like nginx without its app (502, or 503 with `Retry-After: retry_after_s`).
    """

    latency_s: float = 0.0
    error_rate: float = 0.0
    locked: frozenset[str] = frozenset()
    refuse_ids: frozenset[str] = frozenset()
    hang: bool = False
    down: bool = False
    retry_after_s: float | None = None

    def to_json(self) -> dict[str, object]:
        """The faults as `GET /_fake/faults` shows them (name lists sorted)."""
        return {
            "latency_s": self.latency_s,
            "error_rate": self.error_rate,
            "locked": sorted(self.locked),
            "refuse_ids": sorted(self.refuse_ids),
            "hang": self.hang,
            "down": self.down,
            "retry_after_s": self.retry_after_s,
        }


class FaultsError(ValueError):
    """A fault setting is malformed; the control endpoint answers 400 with this text."""


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultsError(f"{name} must be a number")
    return float(value)


def _duration(name: str, value: object) -> float:
    seconds = _number(name, value)
    if seconds < 0:
        raise FaultsError(f"{name} must not be negative")
    return seconds


def _optional_duration(name: str, value: object) -> float | None:
    return None if value is None else _duration(name, value)


def _share(name: str, value: object) -> float:
    share = _number(name, value)
    if not 0 <= share <= 1:
        raise FaultsError(f"{name} must be between 0 and 1")
    return share


def _names(name: str, value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise FaultsError(f"{name} must be a list of strings")
    return frozenset(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise FaultsError(f"{name} must be true or false")
    return value


_READERS: dict[str, Callable[[str, object], object]] = {
    "latency_s": _duration,
    "error_rate": _share,
    "locked": _names,
    "refuse_ids": _names,
    "hang": _flag,
    "down": _flag,
    "retry_after_s": _optional_duration,
}


def updated(faults: Faults, changes: object) -> Faults:
    """`faults` with the keys given in `changes` replaced; the others keep their value.

    Raises `FaultsError` for a body that is not an object, an unknown key or a bad value.
    """
    if not isinstance(changes, dict):
        raise FaultsError("the body must be a JSON object")
    unknown = sorted(set(changes) - set(_READERS))
    if unknown:
        raise FaultsError(f"unknown fault(s): {', '.join(unknown)}; known: {', '.join(_READERS)}")
    values: dict[str, Any] = {name: _READERS[name](name, value) for name, value in changes.items()}
    return dataclasses.replace(faults, **values)

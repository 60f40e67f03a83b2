"""Search parameters as a space's YAML writes them: a fixed value, a range `{low, high[, log]}`, `{choices:
[...]}` (drawn by a sampler) or `{grid: [...]}` (every value). Each error names the space file and the key."""

from __future__ import annotations

from dataclasses import dataclass

from tfsearch.errors import InputError


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Choices:
    values: tuple


@dataclass(frozen=True)
class Grid:
    values: tuple


Param = float | int | str | FloatRange | Choices | Grid


def fail(source: str, key: str, expected: str, got: object) -> InputError:
    """The error for a key of a space file whose value is not what is expected."""
    return InputError(f"{source}: {key}: expected {expected}, got {got!r}")


def _number(value: object, source: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(source, key, "a number", value)
    return float(value)


def parse_param(value: object, source: str, key: str) -> Param:
    """One parameter as its YAML wrote it; the caller checks the values' own range."""
    if isinstance(value, dict):
        kinds = set(value) & {"low", "choices", "grid"}
        if len(kinds) != 1:
            raise fail(source, key, "a number, {low, high[, log]}, {choices: [...]} or {grid: [...]}", value)
        if "low" in value:
            unknown = set(value) - {"low", "high", "log"}
            if unknown or "high" not in value:
                raise fail(source, key, "{low, high[, log]}", value)
            low, high = (
                _number(value["low"], source, f"{key}.low"),
                _number(value["high"], source, f"{key}.high"),
            )
            if low > high:
                raise fail(source, key, "low <= high", value)
            return FloatRange(low, high, bool(value.get("log", False)))
        kind = "choices" if "choices" in value else "grid"
        items = value[kind]
        if set(value) != {kind} or not isinstance(items, list) or not items:
            raise fail(source, f"{key}.{kind}", "a non-empty list", items)
        return Choices(tuple(items)) if kind == "choices" else Grid(tuple(items))
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise fail(source, key, "a number or a mapping", value)
    return value


def param_values(param: Param) -> list:
    """The finite values a parameter can take (ranges give their two bounds)."""
    if isinstance(param, FloatRange):
        return [param.low, param.high]
    if isinstance(param, Choices | Grid):
        return list(param.values)
    return [param]

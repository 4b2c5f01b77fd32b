"""Reading a YAML/TOML mapping field by field: every field is taken once, by dotted path, so what is
left over can be named as unknown, and every type error names the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hetero_testnet.errors import ConfigError


@dataclasses.dataclass
class ConfigNotes:
    """What a config said that does nothing here, collected while it is read (config/psyche.py words it)."""

    psyche: bool = False
    """A `.toml` read in Psyche mode: a field neither tool knows is noted (Psyche's deserializer ignores
    unknown keys) instead of being an error, as it is in our own YAML."""
    no_effect: list[str] = dataclasses.field(default_factory=list)
    """Psyche fields this tool accepts but does not implement, as `path (what happens instead)`."""
    unknown: list[str] = dataclasses.field(default_factory=list)
    """Fields neither Psyche nor this tool knows (Psyche mode only)."""


class Fields:
    """Pops fields from a mapping by dotted path, so leftovers can be reported as unknown."""

    def __init__(self, raw: Any, path: str, notes: ConfigNotes | None = None) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config field {path or '<top>'} must be a mapping")
        self.raw = dict(raw)
        self.path = path
        self.notes = notes if notes is not None else ConfigNotes()

    def no_effect(self, key: str, why: str) -> None:
        """Accept a Psyche field this tool does not implement: drop it and note `why` (what happens instead)."""
        if key in self.raw:
            self.raw.pop(key)
            self.notes.no_effect.append(f"{self._name(key)} ({why})")

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def section(self, key: str) -> "Fields":
        return Fields(self.raw.pop(key, None), self._name(key), self.notes)

    def one_of(self, key: str, variant: str) -> "Fields":
        """A Psyche enum table like `lr_schedule.Cosine`: only `variant` is supported."""
        sub = self.section(key)
        if not sub.raw:
            return sub
        if set(sub.raw) != {variant}:
            raise ConfigError(f"config field {sub.path} must be {{{variant}: ...}} "
                              f"(got {', '.join(map(str, sub.raw))})")
        return sub.section(variant)

    def variant(self, key: str, choices: tuple[str, ...]) -> tuple[str | None, "Fields"]:
        """A Psyche enum table with several supported variants, e.g. `optimizer.AdamW` or
        `optimizer.Distro`: (the variant's name, its fields); (None, empty) when the table is absent."""
        sub = self.section(key)
        if not sub.raw:
            return None, sub
        if len(sub.raw) != 1 or next(iter(sub.raw)) not in choices:
            raise ConfigError(f"config field {sub.path} must be one of "
                              f"{' | '.join(f'{{{c}: ...}}' for c in choices)} (got {', '.join(map(str, sub.raw))})")
        name = str(next(iter(sub.raw)))
        return name, sub.section(name)

    def take(self, key: str, kind: type, default: Any = dataclasses.MISSING) -> Any:
        if key not in self.raw:
            if default is dataclasses.MISSING:
                raise ConfigError(f"config field {self._name(key)} is required")
            return default
        value = self.raw.pop(key)
        return coerce(value, kind, self._name(key))

    def done(self) -> None:
        """Every field must have been taken: leftovers are an error, or in Psyche mode a note."""
        if self.raw and self.notes.psyche:
            self.notes.unknown.extend(self._name(str(k)) for k in self.raw)
            self.raw.clear()
        if self.raw:
            unknown = ", ".join(self._name(str(k)) for k in self.raw)
            raise ConfigError(f"unknown config field {unknown}")


def coerce(value: Any, kind: type, name: str) -> Any:
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is tuple and isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return tuple(float(v) for v in value)
    if kind is dict and isinstance(value, dict):
        return value
    if kind is list and isinstance(value, list):
        return value
    raise ConfigError(f"config field {name} must be {kind.__name__} (got {value!r})")


def int_tuple(values: list, name: str) -> tuple[int, ...]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"config field {name} must be a list of integers (got {values!r})")
    return tuple(values)


def dataclass_from(cls: type, fields: Fields, names: dict[str, type], **fixed: Any) -> Any:
    """`cls` from the `names` fields of `fields` (absent ones take the dataclass default, or the
    value given in `fixed`, which also sets fields that are not read at all)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)} | fixed
    kwargs = {n: fields.take(n, kind, defaults.get(n, dataclasses.MISSING)) for n, kind in names.items()}
    fields.done()
    return cls(**(fixed | kwargs))


def location(fields: Fields, key: str, base_dir: Path, default: Path | None) -> Path | None:
    """Psyche's `data_location = { Local = "dir" }` (a plain string is accepted too)."""
    if key not in fields.raw:
        return default
    value = fields.raw.pop(key)
    if isinstance(value, dict) and set(value) == {"Local"} and isinstance(value["Local"], str):
        value = value["Local"]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config field {fields._name(key)} must be {{Local: <directory>}}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()

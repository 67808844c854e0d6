"""One way to declare and check an experiment config: a schema of the keys every experiment reads.

A schema maps each key of an ml_collections ConfigDict to a `Key` (its type and, optionally, its allowed
values or range) or to a nested schema (a sub-ConfigDict), or to `Each(schema)` (a list of sub-ConfigDicts,
e.g. training stages). `check` walks config and schema together and raises the experiment's own error class
with one line naming the first problem: an unknown key (nothing would read it: a silent bug), a missing key,
a value of the wrong type, or a value out of range. Checks that relate several keys stay with the experiment.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping


class ConfigError(ValueError):
  """A config that does not match its schema; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Key:
  """One config value: its type(s), and optionally the allowed choices or an inclusive numeric range."""

  types: type | tuple[type, ...]
  choices: tuple = ()
  minimum: float | None = None
  maximum: float | None = None
  optional: bool = False     # may be absent (then the experiment's default applies)

  def problem(self, value: Any) -> str | None:
    types = self.types if isinstance(self.types, tuple) else (self.types,)
    if float in types and isinstance(value, numbers.Real) and not isinstance(value, bool):
      pass  # an int where a float is expected is fine (1 for 1.0)
    elif not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
      names = " or ".join(t.__name__ for t in types)
      return f"must be {names}, got {type(value).__name__} {value!r}"
    if self.choices and value not in self.choices:
      return f"must be one of {', '.join(map(repr, self.choices))}, got {value!r}"
    if self.minimum is not None and isinstance(value, numbers.Real) and value < self.minimum:
      return f"must be >= {self.minimum:g}, got {value!r}"
    if self.maximum is not None and isinstance(value, numbers.Real) and value > self.maximum:
      return f"must be <= {self.maximum:g}, got {value!r}"
    return None


@dataclasses.dataclass(frozen=True)
class Each:
  """A list (or tuple) of sub-configs, each checked against `schema`."""

  schema: Mapping[str, Any]
  minimum: int = 0


def _keys(config) -> list[str]:
  return list(config.keys()) if hasattr(config, "keys") else []


def check(config, schema: Mapping[str, Any], *, error: type[ValueError] = ConfigError, where: str = "config",
          allow_extra: bool = False) -> None:
  """Raises `error` naming the first key of `config` that does not match `schema` (see the module docstring)."""
  present = set(_keys(config))
  unknown = sorted(present - set(schema))
  if unknown and not allow_extra:
    raise error(f"unknown config key {where}.{unknown[0]} (nothing reads it); known keys of {where}: "
                f"{', '.join(sorted(schema))}")
  for name, spec in schema.items():
    path = f"{where}.{name}"
    if name not in present:
      if isinstance(spec, Key) and spec.optional:
        continue
      raise error(f"config key {path} is missing")
    value = config[name]
    if isinstance(spec, Key):
      problem = spec.problem(value)
      if problem:
        raise error(f"config key {path} {problem}")
    elif isinstance(spec, Each):
      if not isinstance(value, (list, tuple)) or len(value) < spec.minimum:
        raise error(f"config key {path} must be a list of at least {spec.minimum} entries, got {value!r}")
      for i, item in enumerate(value):
        if not hasattr(item, "keys"):
          raise error(f"config key {path}[{i}] must be a config dict, got {type(item).__name__}")
        check(item, spec.schema, error=error, where=f"{path}[{i}]")
    else:
      if not hasattr(value, "keys"):
        raise error(f"config key {path} must be a config dict, got {type(value).__name__}")
      check(value, spec, error=error, where=path)


# Shorthands for schemas.
INT, FLOAT, BOOL, STR = Key(int), Key(float), Key(bool), Key(str)
POSITIVE_INT = Key(int, minimum=1)
NON_NEGATIVE_INT = Key(int, minimum=0)
SEQUENCE = Key((tuple, list))

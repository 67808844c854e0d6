"""The command line every experiment shares.

  python experiments/NAME.py --config=configs/NAME.py[:VARIANT] [--config.key.sub=value ...] [--workdir=DIR]
      [--verbosity=0|1|2] [--coordinator=HOST:PORT --num_processes=N --process_id=I] [--cpu_devices=N]

--config names a configs/*.py file whose get_config(VARIANT) returns an ml_collections ConfigDict; every
--config.PATH=VALUE override must name an existing key (list items as stages[0].length) and is parsed by the
type of the value it replaces (Python literals for tuples, lists, numbers and None). Multi-process flags start
jax.distributed (lrjax.distributed); without them a cluster environment is detected, or the run is single-process.

Quiet by default: library logs at WARNING (--verbosity=1 for INFO, 2 for DEBUG), so the first lines a user sees
are lrjax's. Bad input of any kind (an unknown key, a bad value, a missing file, an unknown variant) prints one
line, `error: ...`, and exits 1; real bugs keep their traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import logging
import os
import sys
from typing import Callable, Sequence

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FLAGS = ("config", "workdir", "verbosity", "coordinator", "num_processes", "process_id", "cpu_devices")
_QUIET = ("jax", "absl", "orbax", "flax", "etils", "grain", "asyncio", "tensorflow", "h5py", "matplotlib")


class CommandLineError(ValueError):
  """A command line that cannot be used; the message names the flag or key."""


@dataclasses.dataclass
class Args:
  config: ml_collections.ConfigDict
  workdir: str
  verbosity: int
  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  cpu_devices: int | None


def load_config(spec: str) -> ml_collections.ConfigDict:
  """get_config(VARIANT) of FILE for "FILE[:VARIANT]" (paths relative to the working directory or the repo)."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path) and os.path.isfile(os.path.join(ROOT, path)):
    path = os.path.join(ROOT, path)
  if not os.path.isfile(path):
    raise CommandLineError(f"--config: no such config file {path!r}")
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # config files import their siblings as `configs.NAME`
  module_spec = importlib.util.spec_from_file_location(f"_lrjax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise CommandLineError(f"--config: {path} has no get_config()")
  try:
    return module.get_config(variant) if variant else module.get_config()
  except ValueError as e:
    raise CommandLineError(f"--config={spec}: {first_line(e)}") from None


def _segments(path: str) -> list:
  out = []
  for part in path.split("."):
    name, _, rest = part.partition("[")
    if name:
      out.append(name)
    while rest:
      index, _, rest = rest.partition("]")
      if not index.isdigit():
        raise CommandLineError(f"--config.{path}: bad list index [{index}]")
      out.append(int(index))
      rest = rest[1:] if rest.startswith("[") else rest
  return out


def _parse_value(raw: str, current, key: str):
  if isinstance(current, bool):
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise CommandLineError(f"--config.{key}: expected True or False, got {raw!r}")
  if isinstance(current, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if current is None:
      return raw
    raise CommandLineError(f"--config.{key}: {raw!r} is not a {type(current).__name__}") from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if current is not None and not isinstance(value, type(current)) and not (
      isinstance(current, (tuple, list)) and isinstance(value, (tuple, list))):
    raise CommandLineError(f"--config.{key}: {raw!r} is not a {type(current).__name__}")
  return tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value


def override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets config.KEY (dots, list indices) from its command-line text; unknown keys are errors."""
  segments = _segments(key)
  node, walked = config, "config"
  for i, seg in enumerate(segments):
    if isinstance(seg, int):
      name, found = f"{walked}[{seg}]", isinstance(node, (list, tuple)) and 0 <= seg < len(node)
    else:
      name, found = f"{walked}.{seg}", hasattr(node, "keys") and seg in node
    if not found:
      keys = sorted(node.keys()) if hasattr(node, "keys") else []
      close = difflib.get_close_matches(str(seg), keys, n=1)
      hint = f"; did you mean {walked}.{close[0]}?" if close else (f"; known keys of {walked}: {', '.join(keys)}"
                                                                   if keys else "")
      raise CommandLineError(f"unknown config key {name} (nothing reads it){hint}")
    if i == len(segments) - 1:
      break
    node, walked = node[seg], name
  value = _parse_value(raw, node[seg], key)
  try:
    node[seg] = value
  except (TypeError, ValueError, AttributeError) as e:
    raise CommandLineError(f"--config.{key}={raw}: {first_line(e)}") from None


def parse(argv: Sequence[str], *, default_config: str, default_workdir: str = "") -> Args:
  """Args from argv (without the program name)."""
  values: dict = {"config": default_config, "workdir": default_workdir}
  overrides = []
  for arg in argv:
    if arg in ("-h", "--help", "--helpshort", "--helpfull"):
      raise SystemExit(print(__doc__) or 0)
    if not arg.startswith("--") or "=" not in arg:
      raise CommandLineError(f"unexpected argument {arg!r} (flags are --name=value)")
    name, value = arg[2:].split("=", 1)
    if name.startswith("config."):
      overrides.append((name[len("config."):], value))
    elif name in _FLAGS:
      values[name] = value
    else:
      raise CommandLineError(f"unknown flag --{name} (known: {', '.join('--' + f for f in _FLAGS)}, "
                             "--config.KEY=VALUE)")
  config = load_config(values["config"])
  for key, raw in overrides:
    override(config, key, raw)
  integer = lambda name: None if values.get(name) in (None, "") else _int_flag(name, values[name])
  return Args(config=config, workdir=values["workdir"], verbosity=integer("verbosity") or 0,
              coordinator=values.get("coordinator"), num_processes=integer("num_processes"),
              process_id=integer("process_id"), cpu_devices=integer("cpu_devices"))


def _int_flag(name: str, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise CommandLineError(f"--{name} must be an integer, got {value!r}") from None


def first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def quiet(verbosity: int) -> None:
  """Library loggers at WARNING (verbosity 0), INFO (1) or DEBUG (2); lrjax's own prints are unaffected."""
  level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
  if verbosity > 0:
    logging.basicConfig(level=level, format="%(levelname).1s %(name)s: %(message)s")
  for name in _QUIET:
    logging.getLogger(name).setLevel(level)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if verbosity == 0 else "0")
  try:  # absl's own verbosity (orbax logs through it)
    from absl import logging as absl_logging
    absl_logging.set_verbosity({0: absl_logging.WARNING, 1: absl_logging.INFO}.get(verbosity, absl_logging.DEBUG))
  except ImportError:
    pass


def main(run: Callable[[ml_collections.ConfigDict, str], str | None], *, default_config: str,
         default_workdir: str = "", argv: Sequence[str] | None = None) -> None:
  """Parses the command line, starts the processes, runs `run(config, workdir)` and prints what it returns.

  Exit status 0, or 1 with one `error: ...` line for bad input (any ValueError or OSError).
  """
  argv = sys.argv[1:] if argv is None else argv
  try:
    args = parse(argv, default_config=default_config, default_workdir=default_workdir)
    quiet(args.verbosity)
    from lrjax import distributed  # imports jax: after the logging levels are set
    if args.cpu_devices:
      distributed.set_cpu_devices(args.cpu_devices)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    message = run(args.config, args.workdir)
  except (ValueError, OSError) as e:
    print(f"error: {first_line(e)}", file=sys.stderr)
    sys.exit(1)
  if message:
    print(message)

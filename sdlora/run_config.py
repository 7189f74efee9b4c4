"""A run as one TOML file: `--config run.toml` sets train_lora.py's constants (flags still override them), and the
resolved settings are written back as TOML into the output folder, so a run is one file to share.

The file is flat: `name = value` per constant, with the constant's own type (a list of strings for a tuple such as
sample_prompts, of numbers for judge_multipliers). Reading uses Python's tomllib; writing needs no package for flat key/values (toml_text).
"""

import difflib
import math
import tomllib
from pathlib import Path

from sdlora.settings import ConfigError


def read_toml(path: str | Path, option: str) -> dict:
    """The table of a TOML file; a missing or unreadable file, or a syntax error (with its line and column), is a
    ConfigError naming `option` and the file."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{option} {path}: file not found; check the path") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{option} {path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                          f"{error.start}); re-save it as UTF-8") from None
    except tomllib.TOMLDecodeError as error:  # its message ends "(at line L, column C)"
        raise ConfigError(f"{option} {path}: not valid TOML: {error}; fix that line") from None


def nearest_name(name: str, names: list[str]) -> str:
    """", did you mean 'x'?" for the closest known name, or "" when none is close."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def read_run_config(path: str | Path, defaults: dict) -> dict:
    """The settings of a run TOML, each checked against `defaults` (the constants): a known name, a value of the
    constant's type (an integer is a float too; a tuple is a list of strings, or of numbers where its default holds numbers). Returns {name: value}, tuples as
    tuples."""
    table = read_toml(path, "--config")
    values = {}
    for name, value in table.items():
        if name not in defaults:
            raise ConfigError(f"--config {path}: unknown setting {name!r}{nearest_name(name, list(defaults))} "
                              f"(the settings are train_lora.py's constants, listed in docs/options.md)")
        values[name] = typed_value(path, name, value, defaults[name])
    return values


def typed_value(path, name: str, value, default):
    """`value` as the type of `default`, or a ConfigError naming the setting, the value and the type expected."""
    def wrong(kind: str) -> ConfigError:
        return ConfigError(f"--config {path}: {name} = {value!r}: expected {kind}, like its default {default!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("a whole number")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if isinstance(default, tuple) and default and isinstance(default[0], float):  # e.g. judge_multipliers
        if not isinstance(value, list) or not all(isinstance(item, (int, float)) and not isinstance(item, bool)
                                                  for item in value):
            raise wrong("a list of numbers, e.g. [0.6, 0.8, 1.0]")
        return tuple(float(item) for item in value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise wrong("a list of strings, e.g. [\"a photo of sks dog\"]")
        return tuple(value)
    if not isinstance(value, str):
        raise wrong("a string in quotes")
    return value


def toml_value(value) -> str:
    """One value in TOML: strings as basic strings with escapes, booleans lower-case, floats always with a point
    or exponent (or inf / nan), tuples and lists as arrays."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    escaped = "".join(_ESCAPES.get(c, c if c.isprintable() else f"\\u{ord(c):04x}") for c in str(value))
    return f'"{escaped}"'


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_text(values: dict, header: str = "") -> str:
    """Flat `name = value` lines (after `header` as comment lines): what read_run_config reads back."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + "".join(f"{name} = {toml_value(value)}\n" for name, value in values.items())

"""Configs are frozen dataclasses: each field documented in the class docstring's `Attributes:`
section, a field with a fixed set of values declared with `choice`, a sub-config as a nested
dataclass field. Launchers generate their flags from this (`launch/flags.py`); the checks here are
the ones every method's `Config.validate` shares.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from typing import Any, Iterable, Sequence


def choice(default: Any, options: Iterable[Any]) -> Any:
    """A dataclass field whose value (or, for a tuple field, each element) is one of `options`."""
    return dataclasses.field(default=default, metadata={"choices": tuple(options)})


def nested(config_cls: type, **overrides: Any) -> Any:
    """A dataclass field holding a sub-config, by default `config_cls(**overrides)`."""
    return dataclasses.field(default_factory=lambda: config_cls(**overrides))


_ATTRIBUTE = re.compile(r"^(\w+)(?: \([^)]*\))?: ?(.*)$")


def field_docs(config_cls: type) -> dict[str, str]:
    """{field name: its text} from the `Attributes:` section of the class docstring (Google style:
    `name: text`, continued on more deeply indented lines)."""
    lines = inspect.cleandoc(config_cls.__doc__ or "").splitlines()
    docs: dict[str, str] = {}
    inside, current = False, None
    for line in lines:
        if line.strip() == "Attributes:":
            inside, current = True, None
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):  # the next section
            break
        text = line.strip()
        match = _ATTRIBUTE.match(text)
        if match and len(line) - len(line.lstrip()) <= 4:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current and text:
            docs[current] += " " + text
    return docs


def check_choices(config: Any, prefix: str = "") -> None:
    """Raises `ValueError` naming the first field (nested configs included) whose value is not one
    of its declared choices."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{field.name}_")
            continue
        allowed = field.metadata.get("choices")
        if allowed is None:
            continue
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if item not in allowed:
                raise ValueError(f"Unknown {prefix}{field.name} {item!r}; choose one of "
                                 f"{', '.join(map(str, allowed))}.")


def check_positive(config: Any, fields: Sequence[str]) -> None:
    """Raises `ValueError` naming the first of `fields` whose value in `config` is below 1."""
    for field in fields:
        if getattr(config, field) < 1:
            raise ValueError(f"{field} must be positive, got {getattr(config, field)}.")


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON values (nested configs as nested dicts, tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(config_cls: type, values: dict[str, Any], retired: Iterable[str] = ()) -> Any:
    """The inverse of `to_dict`: a `config_cls` from the plain values of its `config.json` (nested
    dicts become sub-configs, lists of tuple fields tuples); a field the dict lacks keeps its
    default, a `retired` key (a removed field, as older runs' files hold it) is dropped, and any
    other key `config_cls` does not know is refused."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    retired = set(retired)
    values = {name: value for name, value in values.items() if name not in retired}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{config_cls.__qualname__} has no field {', '.join(unknown)}.")
    defaults = config_cls()
    kwargs = {}
    for name, value in values.items():
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            value = from_dict(type(default), value)
        elif isinstance(default, tuple):
            value = tuple(value)
        kwargs[name] = value
    return config_cls(**kwargs)

"""Where configuration values come from, before the models validate them.

Three steps turn text into the mapping `pipeline.config.Settings` validates, each one
reporting problems as (key, why) instead of raising, so one run shows every mistake:

1. `expand_variables`: `${VAR}`, `${VAR:-default}` (unset or empty) and `${VAR-default}`
   (unset) inside YAML string values, `$$` for a literal `$`, the way Docker Compose
   and Kubernetes users template secrets and broker lists. Defaults are literal text.
2. `environment_overrides`: `ENVOYGEO_<SECTION>__<KEY>=...` variables, walked against
   the models so a misspelt section or key is an error with a suggestion, never a
   silently ignored variable. Variables without `__` that do not name a section are
   left alone (ENVOYGEO_CONFIG, ENVOYGEO_NATIVE, ... belong to other parts).
3. `coerce_strings`: a string given for a list-typed key becomes a list, from JSON
   (`["a", "b"]`) or comma-separated text (`a,b`), and a lone number a one-item list;
   for a mapping or a section it must be a JSON object; an empty string unsets an
   optional key; an empty section (`geoip:` with its keys commented out) is the
   section's defaults. Decided by each field's type, so every list setting, present
   and future, accepts every form.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from pydantic import BaseModel

ENV_PREFIX = "ENVOYGEO_"
ENV_DELIMITER = "__"

Problem = tuple[str, str]  # (key or variable name, why)
Loc = tuple[str | int, ...]

# `$$`, `${...}`, or a `${` never closed.
_REFERENCE = re.compile(r"\$\$|\$\{([^}]*)\}|\$\{")
_BODY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:-|-)(.*))?$", re.DOTALL)

Shape = Literal["model", "list", "dict", "scalar"]

# Kubernetes gives every pod `<SERVICE>_PORT=tcp://<ip>:<port>` for each Service in its
# namespace (enableServiceLinks): the `envoygeo-metrics` Service yields
# ENVOYGEO_METRICS_PORT, which is not a misspelt metrics.port.
_SERVICE_LINK = re.compile(r"^(?:tcp|udp|sctp)://")


def dotted(loc: Loc) -> str:
    """`kafka.topics.0`: the key as the error messages name it."""
    return ".".join(str(p) for p in loc) or "(top level)"


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean x?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


# -- 1. ${VAR} in the YAML ---------------------------------------------------------

def expand_variables(node: Any, environ: Mapping[str, str],
                     loc: Loc = ()) -> tuple[Any, list[Problem]]:
    """A copy of the YAML tree with references in string values expanded."""
    problems: list[Problem] = []
    if isinstance(node, dict):
        out: dict[Any, Any] = {}
        for key, value in node.items():
            out[key], sub = expand_variables(value, environ, (*loc, str(key)))
            problems += sub
        return out, problems
    if isinstance(node, list):
        items = []
        for i, value in enumerate(node):
            item, sub = expand_variables(value, environ, (*loc, i))
            items.append(item)
            problems += sub
        return items, problems
    if not isinstance(node, str) or "$" not in node:
        return node, problems

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "$$":
            return "$"
        body = match.group(1)
        parsed = _BODY.match(body) if body is not None else None
        if parsed is None:
            problems.append((dotted(loc), f"{text!r} is not a ${{VAR}}, ${{VAR:-default}} "
                                          "or ${VAR-default} reference (write $$ for a "
                                          "literal $)"))
            return text
        name, op, default = parsed.groups()
        value = environ.get(name)
        if op == ":-" and not value:
            return default  # type: ignore[no-any-return]
        if op == "-" and value is None:
            return default  # type: ignore[no-any-return]
        if value is None:
            problems.append((dotted(loc), f"environment variable {name} is not set "
                                          f"(referenced as {text}; give a default with "
                                          f"${{{name}:-...}})"))
            return text
        return value

    return _REFERENCE.sub(replace, node), problems


# -- field shapes --------------------------------------------------------------------

def field_shape(annotation: Any) -> tuple[Shape, Any, bool]:
    """(shape, item/model type, optional) of a field's annotation.

    `list[str]`, `tuple[int, ...]`, `list[Annotated[str, ...]]` are lists; a BaseModel
    subclass is a model; `dict[...]` a dict; anything else a scalar."""
    optional = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            if len(args) != 1:
                return "scalar", None, optional
            annotation = args[0]
            continue
        break
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation, optional
    if origin in (list, tuple, set, frozenset):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        item = args[0] if args else Any
        while typing.get_origin(item) is typing.Annotated:
            item = typing.get_args(item)[0]
        return "list", item, optional
    if origin is dict or annotation is dict:
        return "dict", None, optional
    return "scalar", None, optional


def model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The model class whose fields live at `loc` (list indexes skipped), if any."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        shape, inner, _ = field_shape(field.annotation)
        if shape in ("model", "list") and isinstance(inner, type) and issubclass(
                inner, BaseModel):
            model = inner
        else:
            return None
    return model


# -- 2. ENVOYGEO_* variables ---------------------------------------------------------

def _variable(path: list[str]) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(path).upper()


def environment_overrides(root: type[BaseModel], environ: Mapping[str, str],
                          ) -> tuple[list[tuple[Loc, Any, str]], list[Problem]]:
    """(key path, value, variable name) per ENVOYGEO_* setting, most general first."""
    found: list[tuple[Loc, Any, str]] = []
    problems: list[Problem] = []
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):]
        parts = rest.split(ENV_DELIMITER)
        if len(parts) == 1:
            lowered = rest.lower()
            if lowered not in root.model_fields:
                if not _SERVICE_LINK.match(value):
                    problems += _one_underscore(root, name, lowered)
                continue  # someone else's variable (ENVOYGEO_CONFIG, ENVOYGEO_NATIVE, ...)
        loc, why = _walk(root, [p.lower() for p in parts])
        if why is not None:
            problems.append((name, why))
            continue
        found.append((loc, value, name))
    found.sort(key=lambda item: len(item[0]))
    return found, problems


def _one_underscore(root: type[BaseModel], name: str, lowered: str) -> list[Problem]:
    """ENVOYGEO_KAFKA_BOOTSTRAP_SERVERS: a setting written with one underscore."""
    for section in root.model_fields:
        key = lowered.removeprefix(section + "_")
        model = model_at(root, (section,))
        if key != lowered and model is not None and key in model.model_fields:
            return [(name, "not a setting: sections and keys are separated by two "
                           f"underscores (did you mean {_variable([section, key])}?)")]
    return []


def _walk(root: type[BaseModel], parts: list[str]) -> tuple[Loc, str | None]:
    """The key path a variable's parts name, or why they name none."""
    model: type[BaseModel] = root
    loc: list[str] = []
    for i, part in enumerate(parts):
        if not part:
            return (), "empty name between '__' separators"
        field = model.model_fields.get(part)
        if field is None:
            where = f"section {'.'.join(loc)}" if loc else "the configuration"
            kind = "key" if loc else "section"
            close = difflib.get_close_matches(part, list(model.model_fields), n=1, cutoff=0.6)
            hint = f" (did you mean {_variable([*loc, close[0], *parts[i + 1:]])}?)" \
                if close else f"; known: {', '.join(model.model_fields)}"
            return (), f"{where} has no {kind} {part!r}{hint}"
        loc.append(part)
        shape, inner, _ = field_shape(field.annotation)
        rest = parts[i + 1:]
        if not rest:
            return tuple(loc), None
        if shape == "dict":
            # librdkafka properties and JSON key aliases: the rest is the entry's name.
            return (*loc, ENV_DELIMITER.join(rest)), None
        if shape != "model":
            return (), f"{'.'.join(loc)} is a single value, not a section"
        model = inner
    return tuple(loc), None


def apply_overrides(data: dict[str, Any], overrides: list[tuple[Loc, Any, str]],
                    root: type[BaseModel]) -> tuple[dict[Loc, str], list[Problem]]:
    """Merge the overrides into `data` in place; returns {key path: variable name}."""
    origins: dict[Loc, str] = {}
    problems: list[Problem] = []
    for loc, value, name in overrides:
        parent_model = model_at(root, loc[:-1])
        field = parent_model.model_fields.get(str(loc[-1])) if parent_model else None
        shape = field_shape(field.annotation)[0] if field is not None else "scalar"
        if shape in ("model", "dict") and isinstance(value, str):
            # A whole section (or mapping) as JSON: merged key by key, like the file.
            decoded, why = _json(value, dict, "a JSON object")
            if why is not None:
                problems.append((name, why))
                continue
            value = decoded
        node: dict[str, Any] = data
        for part in loc[:-1]:
            child = node.get(str(part))
            if not isinstance(child, dict):
                child = node[str(part)] = {}
            node = child
        old = node.get(str(loc[-1]))
        if isinstance(value, dict) and isinstance(old, dict):
            _deep_merge(old, value)
        else:
            node[str(loc[-1])] = value
        origins[loc] = name
    return origins, problems


def _deep_merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _json(text: str, kind: type, what: str) -> tuple[Any, str | None]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"expects {what}: {exc.msg} at position {exc.pos} of {text!r}"
    if not isinstance(value, kind):
        return None, f"expects {what}, got {type(value).__name__}"
    return value, None


# -- 3. strings for lists, mappings and optional keys ---------------------------------

def coerce_strings(model: type[BaseModel], data: dict[str, Any],
                   loc: Loc = ()) -> list[Problem]:
    """Rewrite string values by their field's type (see module doc), in place."""
    problems: list[Problem] = []
    for name in list(data):
        field = model.model_fields.get(name)
        if field is None:
            continue  # the model reports unknown keys, with a suggestion
        data[name], sub = _coerce(field.annotation, data[name], (*loc, name))
        problems += sub
    return problems


def _coerce(annotation: Any, value: Any, loc: Loc) -> tuple[Any, list[Problem]]:
    shape, inner, optional = field_shape(annotation)
    key = dotted(loc)
    if isinstance(value, str):
        text = value.strip()
        if optional and not text:
            return None, []
        if shape == "list":
            nested = isinstance(inner, type) and issubclass(inner, BaseModel)
            if text.startswith("[") or nested:
                decoded, why = _json(text, list, "a JSON list" + (
                    " of objects, e.g. [{...}, {...}]" if nested else ""))
                if why is not None:
                    return value, [(key, why)]
                value = decoded
            else:
                return [item.strip() for item in text.split(",") if item.strip()], []
        elif shape in ("model", "dict") and text.startswith("{"):
            decoded, why = _json(text, dict, "a JSON object")
            if why is not None:
                return value, [(key, why)]
            value = decoded
    if value is None and shape == "model" and not optional:
        value = {}  # `geoip:` with every key commented out: the section's defaults
    elif shape == "list" and isinstance(value, int | float) and inner in (int, float, str):
        value = [value]  # `windows: 60`, as `windows: "60"` would be
    problems: list[Problem] = []
    if shape == "model" and isinstance(value, dict):
        problems += coerce_strings(inner, value, loc)
    elif shape == "list" and isinstance(value, list) and isinstance(inner, type) \
            and issubclass(inner, BaseModel):
        for i, item in enumerate(value):
            if isinstance(item, dict):
                problems += coerce_strings(inner, item, (*loc, i))
    return value, problems

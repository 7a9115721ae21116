"""Type checks for the JSON oftsurgery reads (adapter configs, quantization configs, metadata).

Well-formed JSON can still hold the wrong types (`"oft_block_size": "32"`, a config that is `[]`);
every reader checks the values it uses here, before any work, so such a file is refused with one
sentence naming the file, the key and what was expected, instead of failing somewhere deep inside.
"""

from __future__ import annotations

import math
from typing import Any, Callable

# name -> (test, description for the message)
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict": (lambda v: isinstance(v, dict), "a JSON object"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "str_list": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "int_list": (lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
                 "a list of integers"),
}


def describe(value: Any) -> str:
    """`'32' (a string)`: the value and its JSON type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    kind = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({kind})"


def check_fields(data: Any, schema: dict[str, str], where: str, error: type[Exception]) -> dict[str, Any]:
    """Check `data` is a JSON object whose keys in `schema` have the declared kinds; return it.

    A kind is one of the names above, several joined by `|` (`"str|str_list"`), and `?` at the end
    also accepts null. Keys absent from `data` are not checked (the reader's defaults apply).
    """
    if not isinstance(data, dict):
        raise error(f"{where} must hold a JSON object, not {describe(data)}.")
    for key, spec in schema.items():
        if key not in data:
            continue
        value = data[key]
        optional = spec.endswith("?")
        names = spec.rstrip("?").split("|")
        if value is None and optional:
            continue
        if not any(_KINDS[name][0](value) for name in names):
            wanted = " or ".join(_KINDS[name][1] for name in names) + (" or null" if optional else "")
            raise error(f"{where} has {key} = {describe(value)}; it must be {wanted}.")
    return data

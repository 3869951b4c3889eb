"""How true/false/auto values and JSON objects parse, from the command line, config files and Python alike."""

from __future__ import annotations

import json
from typing import Any, Optional, Union

TRUE_STRINGS = ("true", "1", "yes", "y")
FALSE_STRINGS = ("false", "0", "no", "n")
AUTO = "auto"


def parse_bool(value: Any) -> Optional[bool]:
    """``True``/``False`` for a bool or a true/false string (true/false, yes/no, y/n, 1/0), else None."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_STRINGS:
        return True
    if text in FALSE_STRINGS:
        return False
    return None


def parse_auto_bool(name: str, value: Union[str, bool, None]) -> Union[str, bool]:
    """``True``/``False``/``"auto"`` from a bool or a string; raises ``ValueError`` naming ``--name`` otherwise."""
    if str(value).strip().lower() == AUTO:
        return AUTO
    parsed = parse_bool(value)
    if parsed is None:
        raise ValueError(f"--{name}: got {value!r}; choose auto, true or false")
    return parsed


def parse_json_object(value: Any, flag: str) -> Optional[dict]:
    """A dict, None, or a JSON object string (empty means None), as ``--flag`` takes it; anything else raises."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as err:
            raise ValueError(f"--{flag}: not valid JSON ({err}): {value!r}") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"--{flag}: expected a JSON object, got {type(value).__name__}")
    return value

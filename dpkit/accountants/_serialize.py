"""DpEvent <-> JSON-serialisable dict, restricted to the classes of ``dp_accounting.dp_event``.

Loading only ever instantiates classes defined in ``dp_accounting.dp_event`` (never an arbitrary
module named inside the state), so a tampered checkpoint cannot import code.
"""

from __future__ import annotations

import attr
from dp_accounting import dp_event as _dpe


def event_to_dict(event: _dpe.DpEvent) -> dict:
    """Encode a DpEvent as nested dicts/lists of builtins, ``{"type": ClassName, field: ...}``."""
    if type(event).__module__ != _dpe.__name__ or not attr.has(type(event)):
        raise TypeError(f"event must be a dp_accounting.dp_event class to be serialised; got {event!r}")
    out = {"type": type(event).__name__}
    for field in attr.fields(type(event)):
        out[field.name] = _encode(getattr(event, field.name))
    return out


def _encode(value):
    if isinstance(value, _dpe.DpEvent):
        return event_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (int, float, str, bool)):
        value = value.item()  # numpy scalar -> builtin
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"event field of type {type(value).__name__} cannot be serialised: {value!r}")


def event_from_dict(data) -> _dpe.DpEvent:
    """Decode :func:`event_to_dict` output back to the DpEvent (equal to the original)."""
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ValueError(f"event state must be a dict with a 'type' key; got {data!r}")
    cls = getattr(_dpe, data["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, _dpe.DpEvent) and attr.has(cls)):
        raise ValueError(f"event type must name a dp_accounting.dp_event class; got {data['type']!r}")
    kwargs = {}
    for field in attr.fields(cls):
        if field.name not in data:
            raise ValueError(f"event state for {data['type']} is missing field {field.name!r}")
        kwargs[field.name] = _decode(data[field.name], field.name, cls)
    return cls(**kwargs)


def _decode(value, name, cls):
    if isinstance(value, dict):
        return event_from_dict(value)
    if isinstance(value, list):
        return [_decode(v, name, cls) for v in value]
    return value

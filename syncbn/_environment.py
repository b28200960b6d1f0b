"""How the package reads its switches in the environment (docs/environment.md).

A switch is on for ``1``, ``true``, ``yes`` or ``on`` and off for ``0``,
``false``, ``no`` or ``off`` (any case, surrounding spaces ignored); unset or
anything else is neither, and each switch's default decides.
"""

from __future__ import annotations

import os

__all__ = ["switched_off", "switched_on"]

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def _value(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def switched_on(name: str) -> bool:
    """Whether ``$name`` turns its switch on."""
    return _value(name) in _ON


def switched_off(name: str) -> bool:
    """Whether ``$name`` turns its switch off."""
    return _value(name) in _OFF

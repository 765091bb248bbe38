"""Exceptions shared across layers (a leaf module: it imports nothing from the project)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the key or file."""


class TextModelError(ValueError):
    """A user-fixable problem with a text model, its backend or its pairing; the message says what to do."""

"""Exceptions shared across layers (a leaf module: it imports nothing from the project)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the key or file."""


class TextModelError(ValueError):
    """A user-fixable problem with a text model, its backend or its pairing; the message says what to do."""


class RunFailure(Exception):
    """The run cannot go on for a reason outside the config (e.g. the output disk is full): exit 4,
    the message says what to free or fix; completed shards are kept."""

"""Device-specific parts of the pipeline, behind one small interface (base.Backend).

The registry: every backend's name and where its class lives. Config validation (the choices of
infer.backend), `clip-pipeline devices` and the supervisor read it; a backend module is imported
only when it is used (sail and sim need optional libraries). A new backend is one entry here plus
its module (see ARCHITECTURE.md, "Module map").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.backends.base import Backend

# name -> "module:class"; the order is the one `clip-pipeline devices` lists them in
BACKENDS: dict[str, str] = {
    "cpu": "pipeline.backends.cpu:CpuBackend",
    "openvino": "pipeline.backends.openvino:OpenVinoBackend",
    "sail": "pipeline.backends.sail:SailBackend",
    "sim": "pipeline.backends.sim:SimBackend",
    "fake": "pipeline.backends.fake:FakeBackend",
}
NAMES: tuple[str, ...] = tuple(BACKENDS)


def get_backend(name: str) -> type[Backend]:
    """The backend class for a config's infer.backend (imported on first use).

    A backend whose module or library is missing raises ImportError/ModuleNotFoundError (the
    `devices` command reports it as unavailable).
    """
    try:
        module, cls = BACKENDS[name].split(":")
    except KeyError:
        raise ConfigError(f"config key infer.backend: unknown backend {name!r} ({', '.join(NAMES)})") from None
    return getattr(importlib.import_module(module), cls)

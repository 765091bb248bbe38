"""Import open_clip's modules for parity tests, without torchvision.

CI installs torch==2.13.0 (CPU) and `open_clip_torch --no-deps` (its torchvision would pull
another torch). open_clip's package __init__ imports torchvision (transforms), and its utils
module imports torchvision.ops.misc.FrozenBatchNorm2d (used only to freeze ResNet batch norms).
When torchvision is missing, open_clip is loaded as a bare package (its __init__ not run) and
torchvision.ops.misc is stubbed with a FrozenBatchNorm2d that cannot be used; the modules the
tests use (tokenizer, transformer, model) never touch it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def open_clip_module(name: str):
    """open_clip.<name>, or skip the test saying what to install."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("torch is not installed (CI: pip install torch==2.13.0 && pip install --no-deps open_clip_torch==3.3.0)")
    if "open_clip" in sys.modules:
        return importlib.import_module(f"open_clip.{name}")
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (CI: pip install --no-deps open_clip_torch==3.3.0)")
    if importlib.util.find_spec("torchvision") is None:
        misc = types.ModuleType("torchvision.ops.misc")

        class FrozenBatchNorm2d:  # noqa: D401 - a stub
            def __init__(self, *a, **k):
                raise RuntimeError("torchvision is stubbed in this test")

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d
        tv = types.ModuleType("torchvision")
        ops = types.ModuleType("torchvision.ops")
        tv.ops, ops.misc = ops, misc
        sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc})
        pkg = types.ModuleType("open_clip")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["open_clip"] = pkg
    else:
        importlib.import_module("open_clip")
    return importlib.import_module(f"open_clip.{name}")

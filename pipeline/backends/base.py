"""The one interface every device backend implements (cpu, fake, sail, sim).

A backend answers three questions for the pipeline:
  * which device names a config means (`resolve_devices`, run in the supervisor, opens nothing);
  * how to open one device *inside* its worker process (`open_device`, after spawn — device handles
    are never created in the parent);
  * what the device process consumes: `"pixels"` (uint8 RGB crops [n,224,224,3] made by the host
    decode/preprocess workers) or `"files"` (paths: the device process decodes and preprocesses
    itself, e.g. SOPHON hardware JPEG decode whose images live in device memory).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pipeline.errors import TextModelError
from pipeline.model.models import model_identity
from pipeline.wire.messages import Failure

if TYPE_CHECKING:
    from pipeline.config import Config


class DeviceError(RuntimeError):
    """The device (not the input) failed: the worker is restarted and the batch re-issued."""


@dataclass
class FileBatchResult:
    """What a `"files"` device returns for a batch of paths."""

    ids: list[int]
    embeddings: np.ndarray  # [len(ids), dim] float32, rows in the order of ids
    failures: list[Failure] = field(default_factory=list)


@dataclass
class Prepared:
    """A batch of files after the host/decoder part of `embed_files` (see `Device.prepare_files`)."""

    ids: list[int]  # the inputs still to embed, in order
    paths: list[bytes]
    failures: list[Failure] = field(default_factory=list)  # inputs already failed while preparing
    data: Any = None  # whatever the device needs for run_prepared (e.g. decoded images in device memory)


class Device(abc.ABC):
    """An open inference device, owned by one worker process."""

    #: images per inference call
    batch_size: int
    #: True when the model only accepts exactly `batch_size` images (bmodels): the infer stage
    #: zero-pads a short batch and drops the padding rows.
    fixed_batch: bool = False
    #: embedding width
    dim: int = 512
    #: the restart count of the worker process that opened it (0: the first), set by the infer
    #: stage after open_device (the fake backend's faults fire in generation 0 only)
    generation: int = 0

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB [n,224,224,3] (n == batch_size when fixed_batch) -> float32 [n, dim]."""
        raise NotImplementedError

    def embed_files(self, ids: Sequence[int], paths: Sequence[bytes]) -> FileBatchResult:
        """For device_input == "files": decode, preprocess and embed these files."""
        raise NotImplementedError

    # Optional two-phase split of embed_files, so the infer stage can prepare the next batch while
    # the accelerator runs this one (`infer.overlap`). `run_prepared` runs on a background thread,
    # `prepare_files` on the worker's loop thread, possibly at the same time. The defaults do all
    # the work in run_prepared, i.e. no overlap but correct results.
    def prepare_files(self, ids: Sequence[int], paths: Sequence[bytes]) -> Prepared:
        """Decode/preprocess these files (host, JPEG decoder, bmcv); collect per-input failures."""
        return Prepared(ids=list(ids), paths=list(paths))

    def run_prepared(self, prepared: Prepared) -> FileBatchResult:
        """Inference only, on what prepare_files made; prepared.failures are passed through."""
        res = self.embed_files(prepared.ids, prepared.paths)
        if prepared.failures:
            res.failures = list(prepared.failures) + list(res.failures)
        return res

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources."""


def pad_batch(pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Zero-pad [n,...] to [batch_size,...] for fixed-batch models."""
    n = pixels.shape[0]
    if n == batch_size:
        return pixels
    if n > batch_size:
        raise ValueError(f"batch of {n} exceeds the model's fixed batch {batch_size}")
    out = np.zeros((batch_size, *pixels.shape[1:]), dtype=pixels.dtype)
    out[:n] = pixels
    return out


def l2_normalize(emb: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


class TextSession:
    """A text tower opened on a backend (`Backend.open_text`): token ids in, the model's output out.

    `run_ids(int ids [n, context_length]) -> float32 [n, dim]` (a projected tower) or
    `[n, context_length, width]` (the states form; pipeline/text/embed.py gathers and projects).
    `fixed_batch`: the batch a compiled model takes (the caller pads), None for any batch.
    `identity`: what a manifest records about the model when there is no model file (the fake
    backend); None means the model file's own identity."""

    fixed_batch: int | None = None
    context_length: int = 77
    out_rank: int = 2
    out_last: int | None = None
    id_dtype: Any = np.int32
    identity: dict[str, Any] | None = None
    engine_info: dict[str, Any] | None = None  # recorded as the identity's "engine" (openvino: its precision)
    needs_model: bool = True  # False: runs without a model file (the fake backend)

    def run_ids(self, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def text_model(model: str | None) -> str:
    """The text model a backend's open_text runs: refused when none is given."""
    if model is None:
        raise TextModelError("no text model given")
    return model


class Backend(abc.ABC):
    name: ClassVar[str]
    #: "pixels": host workers decode + preprocess; "files": the device process does it.
    device_input: ClassVar[str] = "pixels"

    @classmethod
    @abc.abstractmethod
    def resolve_devices(cls, cfg: Config) -> list[str]:
        """Expand/validate cfg.infer.devices into device names; raise ConfigError on bad entries."""

    @classmethod
    @abc.abstractmethod
    def open_device(cls, cfg: Config, device: str) -> Device:
        """Open `device` in the calling (worker) process."""

    @classmethod
    def resolve(cls, cfg: Config) -> Config:
        """Settings this backend decides once before start, from the machine (e.g. openvino.precision
        = "auto"); refuses what this machine cannot run (ConfigError). Default: cfg unchanged."""
        return cfg

    @classmethod
    def prepare(cls, cfg: Config, log: Callable[[str], None]) -> None:
        """Work done once in the main process after the checks and the model, before any worker
        starts (openvino int8: calibrate and cache the quantised model, so the workers only load it).
        Not called by `run --dry-run`. Default: nothing."""
        return None

    @classmethod
    def model_identity(cls, cfg: Config) -> dict[str, Any]:
        """What identifies the model for the manifest (resume refuses a different one)."""
        return model_identity(cfg.model.path)

    @classmethod
    def fingerprint_fields(cls, cfg: Config) -> dict[str, Any]:
        """Fields this backend adds to the run's fingerprint (resume refuses a change), from the
        resolved config (openvino: the precision, and int8's calibration set). Default: none."""
        return {}

    @classmethod
    def probe(cls) -> dict[str, Any]:
        """For `clip-pipeline devices`: {"available": bool, "devices": [...], "reason": str}."""
        return {"available": True, "devices": [], "reason": ""}

    @classmethod
    def worker_python(cls, cfg: Config) -> str | None:
        """An interpreter to run this backend's infer workers under (None = this one, via spawn)."""
        return None

    @classmethod
    def worker_env(cls, cfg: Config, device: str) -> dict[str, str]:
        """Environment variables for the infer worker of `device`, set when it is started (e.g. a GPU
        backend's CUDA_VISIBLE_DEVICES). They override the inherited environment; default none."""
        return {}

    @classmethod
    def tail_pieces(cls, cfg: Config) -> int:
        """Into how many pieces a batch is cut at the end of a run, to balance the devices
        (pipeline/wire/dispatch.py, tail_images): what a small batch costs per image decides it.
        1 (the default: whole batches) for devices whose batch costs the same full or not
        (fixed-batch bmodels pad; the fake backend's latency is per batch): small pieces would
        make the tail slower, not shorter."""
        return 1

    @classmethod
    def open_text(cls, model: str | None, device: Any = None, threads: int = 1, precision: str = "auto") -> TextSession:
        """The text tower `model` on `device` of this backend, in the calling process (embed-text,
        classify, search --text, eval zero-shot). `precision`: a backend with a precision setting
        (openvino: fp32, bf16, auto) runs the tower at it; the others ignore it. Raises
        TextModelError, naming what to do, for a model this backend cannot run; the default: this
        backend has no text tower."""
        raise TextModelError(f"the {cls.name} backend has no text tower: run the text model on a backend "
                             "that has one (its open_text)")

    @classmethod
    def input_kind(cls, cfg: Config) -> str:
        return "pixels" if cls.device_input == "pixels" else "files"


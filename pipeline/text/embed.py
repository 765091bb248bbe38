"""Text embeddings: tokenise, run CLIP's text tower on a backend, gather/project on the host, normalise.

Python API (what `embed-text`, `classify` and search use)::

    from pipeline.text.embed import embed_texts, text_encoder_for_run, paired_text_model, TextEncoder

    emb = embed_texts(["a photo of a dog"], run="out/cpu-demo")   # float32 [1, dim], L2-normalised,
                                                                   # with the text model paired to the run
    emb = embed_texts(prompts, model="models/clip-text.onnx")      # or a given text model (cpu backend)
    enc = text_encoder_for_run("out/cpu-demo")                     # keep one loaded model for many calls
    res = enc.embed(prompts)                                       # res.embeddings, res.tokens (lengths, truncated)
    enc.pairing, enc.identity()                                    # what to record in your output's manifest

A text model is either form (detected from its output rank, see pipeline/text/model.py):
``projected`` ids -> [B, dim]; or ``states`` ids -> ln_final states [B, 77, width] plus a
projection [width, dim] found beside it (``<stem>.text_projection.npy``, or Sophgo's
``text_projection_<w>_<d>.npy`` in the same directory), gathered at the EOT position and projected
here, as Sophgo's CLIP demo does. Backends: ``cpu`` (onnxruntime), ``openvino`` (OpenVINO on the
CPU, ``precision`` fp32 / bf16 / auto as the image backend's ``openvino.precision``), ``sail`` (a bmodel on a SOPHON
chip, int32 ids through ``Engine.process``, fixed batch padded with zero rows and trimmed),
``sim`` (a bmodel on TPU-MLIR's BM1684X simulator: for checking, seconds per batch), ``fake``
(deterministic, for tests).

Pairing: an image run and a text model belong together when both record the same ``clip_model``
(our builders write ``synthetic:<arch>:seed=<n>:act=<act>``; a real model's sidecar
``<model>.json`` can say e.g. ``{"clip_model": "openai/ViT-B-32"}``). ``paired_text_model(run)``
finds (and for a synthetic run, builds) the text model that matches a run's manifest, and
refuses one that does not match.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends import NAMES, get_backend
from pipeline.data.rundir import RunDir
from pipeline.errors import TextModelError
from pipeline.text.tokenizer import Tokenized, Tokenizer, get_tokenizer


class PairingError(TextModelError):
    """The text model does not (or cannot be shown to) belong with the image model."""


# -- identity and pairing ------------------------------------------------------------------------
def _sidecar(path: str | os.PathLike) -> dict:
    p = Path(f"{path}.json")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def clip_model_of(info: dict) -> str | None:
    """The ``clip_model`` an identity/sidecar records (compiled bmodels: in their ``onnx`` part).

    Synthetic image towers built before this field existed are QuickGELU towers of their arch/seed.
    """
    if not isinstance(info, dict):
        return None
    for d in (info, info.get("info") or {}, (info.get("info") or {}).get("onnx") or {}, info.get("onnx") or {}):
        if isinstance(d, dict) and d.get("clip_model"):
            return str(d["clip_model"])
    side = info.get("info") if isinstance(info.get("info"), dict) else info
    legacy = side.get("builder") == "clip-pipeline modelgen" and side.get("arch") not in (None, "unknown")
    if side.get("synthetic") is True and legacy:
        from pipeline.model.modelgen import clip_model_id

        return clip_model_id(side["arch"], int(side.get("seed") or 0), side.get("act", "quickgelu"))
    return None


def text_model_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What an output's manifest records about the text model (sha256 of the file and the projection)."""
    from pipeline.model.models import sha256_file

    path = Path(path)
    if not path.is_file():
        raise TextModelError(f"text model {path} does not exist (give --text-model PATH, or build one: "
                             f"clip-pipeline build-model PATH --tower text)")
    info = _sidecar(path)
    synthetic = bool(info.get("synthetic") or (info.get("onnx") or {}).get("synthetic_weights"))
    ident = {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size, "synthetic": synthetic,
             "arch": info.get("arch", "unknown"), "clip_model": clip_model_of(info), "info": info}
    return ident


@dataclass
class Pairing:
    path: str  # the text model
    status: str  # "matched" (same clip_model recorded), "asserted" (--assume-paired)
    clip_model: str | None
    image_clip_model: str | None

    def as_dict(self) -> dict:
        return {"status": self.status, "text_clip_model": self.clip_model, "image_clip_model": self.image_clip_model}


def read_run_manifest(run: str | os.PathLike) -> dict:
    p = RunDir(run).manifest
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise TextModelError(f"{run} holds no clip-pipeline run (no manifest.json)") from None
    except (OSError, ValueError) as exc:
        raise TextModelError(f"{p} cannot be read: {exc}") from None
    if not isinstance(m, dict) or "model" not in m:
        raise TextModelError(f"{p} is not a clip-pipeline image run manifest")
    return m


def check_pairing(image_model: dict, text_path: str | os.PathLike, assume_paired: bool = False) -> Pairing:
    """Refuse a text model that does not belong with ``image_model`` (a manifest's ``model``)."""
    img = clip_model_of(image_model)
    txt = clip_model_of(text_model_identity(text_path))
    if img and txt and img == txt:
        return Pairing(str(text_path), "matched", txt, img)
    if img and txt:
        raise PairingError(f"text model {text_path} is {txt} but the image embeddings come from {img}: they do not "
                           "belong together (use the text tower of the same CLIP model)")
    if assume_paired:
        return Pairing(str(text_path), "asserted", txt, img)
    missing = "the image model" if not img else f"text model {text_path}"
    raise PairingError(f"cannot tell whether text model {text_path} belongs with the image model ({missing} records no "
                       "clip_model): add {\"clip_model\": NAME} to both models' .json sidecars, or pass --assume-paired")


def synthetic_text_path(image_model_path: str | os.PathLike, clip_model: str) -> Path:
    m = re.fullmatch(r"synthetic:([\w-]+):seed=(-?\d+):act=(\w+)", clip_model)
    if not m:
        raise ValueError(clip_model)
    arch, seed, act = m.groups()
    return Path(image_model_path).parent / f"clip-text-{arch}-seed{seed}-{act}-synthetic.onnx"


def paired_text_model(run: str | os.PathLike, text_model: str | os.PathLike | None = None,
                      assume_paired: bool = False, build: bool = True, log=None) -> Pairing:
    """The text model for the image run in ``run``, checked against its manifest.

    Without ``text_model``: the image model's sidecar ``text_model`` entry if it names one; for a
    synthetic image model, the synthetic text tower of the same arch/seed/activation beside it
    (built on first use when ``build``); else TextModelError asking for ``--text-model``.
    """
    manifest = read_run_manifest(run)
    image = manifest["model"]
    if text_model is None and image.get("arch") == "fake":  # the fake image backend pairs with the fake text backend
        return Pairing("", "matched", "fake", "fake")
    if text_model is None:
        img_info = image.get("info") or {}
        named = img_info.get("text_model")
        clip_model = clip_model_of(image)
        if named:
            base = Path(str(image.get("path", ""))).parent
            text_model = Path(named) if os.path.isabs(named) else base / named
        elif clip_model and clip_model.startswith("synthetic:"):
            text_model = synthetic_text_path(image.get("path", "models/x"), clip_model)
            if not text_model.exists():
                if not build:
                    raise TextModelError(f"the synthetic text tower {text_model} does not exist; build it with "
                                         f"clip-pipeline build-model {text_model} --tower text")
                _build_synthetic_text(text_model, clip_model, log)
        else:
            raise TextModelError(f"the image model of {run} names no text model: give --text-model PATH "
                                 "(or add \"text_model\": PATH to the image model's .json sidecar)")
    return check_pairing(image, text_model, assume_paired)


def _build_synthetic_text(path: Path, clip_model: str, log=None) -> None:
    from pipeline.text.model import build_clip_text_onnx

    _, arch, seed, act = re.fullmatch(r"(synthetic):([\w-]+):seed=(-?\d+):act=(\w+)", clip_model).groups()
    if log:
        log(f"Building the synthetic CLIP text tower {arch} (seed {seed}, {act}) at {path} — SYNTHETIC random "
            "weights: text embeddings carry no meaning.")
    path.parent.mkdir(parents=True, exist_ok=True)
    build_clip_text_onnx(path, arch=arch, seed=int(seed), act=act)


# -- devices -------------------------------------------------------------------------------------
def find_projection(model_path: str | os.PathLike, width: int | None = None) -> Path | None:
    """The projection of a states-form model: <stem>.text_projection.npy, or Sophgo's
    text_projection_<w>_<d>.npy in the same directory (one match only)."""
    p = Path(model_path)
    own = p.with_name(p.stem + ".text_projection.npy")
    if own.is_file():
        return own
    cands = sorted(p.parent.glob(f"text_projection_{width}_*.npy" if width else "text_projection_*_*.npy"))
    return cands[0] if len(cands) == 1 else None


def open_text_session(model: str | os.PathLike | None, backend: str = "cpu", device: Any = None, threads: int = 1,
                      precision: str = "auto"):
    """The raw text model (``run_ids(int32 [n,77]) -> model output``) on a backend of the registry
    (pipeline/backends: ``Backend.open_text``), for TextEncoder, benchmarks and tools. ``precision``:
    the openvino backend's (fp32, bf16, auto); the other backends ignore it."""
    if backend not in NAMES:
        raise TextModelError(f"text backend {backend!r} not supported (one of {', '.join(NAMES)})")
    return get_backend(backend).open_text(None if model is None else str(model), device, threads, precision=precision)


@dataclass
class TextEmbedding:
    embeddings: np.ndarray  # float32 [n, dim]
    tokens: Tokenized
    normalized: bool = True
    extra: dict = field(default_factory=dict)


class TextEncoder:
    """One loaded text model on one backend/device; ``embed(prompts)`` -> TextEmbedding."""

    def __init__(self, model: str | os.PathLike | None, backend: str = "cpu", device: Any = None, threads: int = 1,
                 batch_size: int = 32, projection: str | os.PathLike | None = None, tokenizer: Tokenizer | None = None,
                 precision: str = "auto"):
        self.backend = backend
        self.model_path = None if model is None else str(model)
        self.pairing: Pairing | None = None
        self.session = open_text_session(model, backend, device, threads, precision)
        self.batch_size = self.session.fixed_batch or int(batch_size)
        self.tokenizer = tokenizer or get_tokenizer()
        self.projection: np.ndarray | None = None
        if self.session.out_rank == 3:
            width = self.session.out_last
            ppath = Path(projection) if projection else find_projection(model, width)
            if ppath is None or not ppath.is_file():
                raise TextModelError(f"text model {model} outputs per-token states [B,77,{width}]: it needs its projection "
                                     f"(<stem>.text_projection.npy or text_projection_{width}_<dim>.npy beside it, "
                                     "or --text-projection FILE)")
            proj = np.load(ppath)
            if proj.ndim != 2 or proj.shape[0] != width:
                raise TextModelError(f"projection {ppath} is {list(proj.shape)}, expected [{width}, dim]")
            self.projection = np.ascontiguousarray(proj, dtype=np.float32)
            self.projection_path = str(ppath)
            self.form = "states"
            self.dim = int(proj.shape[1])
        elif self.session.out_rank == 2:
            self.form = "projected"
            self.projection_path = None
            self.dim = int(self.session.out_last or 0)
        else:
            raise TextModelError(f"text model {model}: output rank {self.session.out_rank}; expected [B,dim] or [B,77,width]")
        if self.session.context_length != self.tokenizer_context:
            raise TextModelError(f"text model {model} takes {self.session.context_length} tokens; CLIP's tokenizer makes 77")

    tokenizer_context = 77

    def identity(self) -> dict[str, Any]:
        if self.session.identity is not None:  # a backend that runs no model file (fake)
            return dict(self.session.identity)
        ident = text_model_identity(self.model_path)
        ident["form"] = self.form
        if self.session.engine_info is not None:  # e.g. openvino: the engine and its resolved precision
            ident["engine"] = dict(self.session.engine_info)
        if self.projection_path:
            from pipeline.model.models import sha256_file

            ident["projection"] = {"path": self.projection_path, "sha256": sha256_file(self.projection_path)}
        return ident

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        """float32 [n, dim], not normalised; batches of batch_size (a fixed batch padded with zero rows)."""
        n = len(ids)
        out = np.empty((n, self.dim), np.float32)
        bs = self.batch_size
        for i in range(0, n, bs):
            chunk = ids[i:i + bs]
            m = len(chunk)
            if self.session.fixed_batch and m < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - m, chunk.shape[1]), chunk.dtype)])
            y = self.session.run_ids(chunk)[:m]
            if self.projection is not None:
                # CLIP: x[arange(B), text.argmax(-1)] @ text_projection (eot is the largest id)
                y = y[np.arange(m), chunk[:m].argmax(axis=1)] @ self.projection
            out[i:i + m] = y
        return out

    def embed(self, prompts: Sequence[str], normalize: bool = True, truncate: bool = True) -> TextEmbedding:
        tokens = self.tokenizer(list(prompts), truncate=truncate)
        emb = self.embed_ids(tokens.ids)
        if normalize:
            emb = l2_normalize(emb)
        return TextEmbedding(emb, tokens, normalize)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def text_encoder_for_run(run: str | os.PathLike, text_model: str | os.PathLike | None = None, assume_paired: bool = False,
                         backend: str = "cpu", log=None, **kw: Any) -> TextEncoder:
    """A TextEncoder with the text model paired with the image run in ``run`` (see paired_text_model);
    a run made by the fake image backend gets the fake text backend. ``kw``: TextEncoder's options."""
    p = paired_text_model(run, text_model, assume_paired=assume_paired, log=log)
    enc = TextEncoder(p.path or None, backend="fake" if p.clip_model == "fake" else backend, **kw)
    enc.pairing = p
    return enc


def embed_texts(prompts: Sequence[str], model: str | os.PathLike | None = None, run: str | os.PathLike | None = None,
                backend: str = "cpu", device: Any = None, threads: int = 1, batch_size: int = 32,
                normalize: bool = True, assume_paired: bool = False, precision: str = "auto") -> np.ndarray:
    """float32 [len(prompts), dim]: CLIP text embeddings (L2-normalised by default).

    Give ``run`` (an image output directory) to use the text model paired with it (checked, see
    ``paired_text_model``), or ``model`` (a text ONNX / bmodel); both: the model is checked against the run.
    """
    kw = {"device": device, "threads": threads, "batch_size": batch_size, "precision": precision}
    if run is not None:
        enc = text_encoder_for_run(run, model, assume_paired, backend, **kw)
    else:
        enc = TextEncoder(model, backend=backend, **kw)
    return enc.embed(prompts, normalize=normalize).embeddings

"""`clip-pipeline eval`: accuracy of the image embeddings, the way the seed measured it.

* `eval linear-probe --train T --test V`: image features through the normal pipeline (any
  backend: the config's model, preprocessing and devices), then an L2-regularised multinomial
  logistic regression (scikit-learn, L-BFGS) as in the CLIP paper's linear-probe evaluation: the
  inverse regularisation strength C is chosen on a held-out validation split of the training set
  (a logarithmic sweep, then a finer one around the best), the classifier is refitted on the whole
  training set with that C, and top-1 / top-5 accuracy on the test set are reported.

Datasets are CIFAR python pickles (`cifar-100-python/train`, `.../test`, or CIFAR-10's
`data_batch_N` / `test_batch`: the seed's `datasets/` layout; the images are written out as PNGs
once, into the work directory) or ImageFolder trees (ROOT/<class name>/**/<image>).

scikit-learn is an optional extra: `pip install 'clip-pipeline[eval]'`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DEFAULT_EXTENSIONS, Config, ConfigError
from pipeline.data.rundir import RunDir
from pipeline.run.featurize import embed_inputs
from pipeline.text.embed import text_encoder_for_run
from pipeline.text.outputs import class_embeddings, zero_shot
from pipeline.wire import pathcodec

SEED_NOTE = ("The seed's 80.08% top-1 (CIFAR-100 linear probe, CLIP ViT-B/32, 16-batch fp16 bmodel on an SE7-32) "
             "needs the real CLIP weights; synthetic random weights give far lower figures on real photos.")
DEFAULT_C_GRID = tuple(10.0 ** e for e in range(-3, 4))  # 0.001 .. 1000, refined around the best


@dataclasses.dataclass
class Dataset:
    """Images with integer labels; `classes[label]` is the class name."""

    source: str
    kind: str  # "cifar" or "imagefolder"
    classes: list[str]
    image_root: str = ""  # imagefolder root, or the directory the cifar images were written to
    labels_by_path: dict[str, int] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels_by_path)


# -- datasets ----------------------------------------------------------------------------------

def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ConfigError(f"{path} is not a CIFAR python pickle ({type(exc).__name__}: {exc}); give "
                          "cifar-100-python/train or /test, or an ImageFolder directory") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} is not a CIFAR python pickle (holds a {type(d).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_class_names(path: Path, n: int, fine: bool) -> list[str]:
    for meta_name, key in (("meta", "fine_label_names" if fine else "coarse_label_names"),
                           ("batches.meta", "label_names")):
        meta = path.parent / meta_name
        if meta.exists():
            names = _unpickle(meta).get(key)
            if names is not None and len(names) >= n:
                return [x.decode() if isinstance(x, bytes) else str(x) for x in names]
    return [f"class_{i}" for i in range(n)]


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def load_cifar(path: str | os.PathLike, work: str | os.PathLike) -> Dataset:
    """A CIFAR-100 (fine labels) or CIFAR-10 pickle; its images are written as PNGs under `work` once."""
    from PIL import Image

    path = Path(path)
    d = _unpickle(path)
    if "data" not in d or not ({"fine_labels", "labels"} & set(d)):
        raise ConfigError(f"{path} has no 'data' and 'fine_labels'/'labels' entries: not a CIFAR python pickle")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d.get("fine_labels", d.get("labels")), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ConfigError(f"{path}: expected data [n, 3072] uint8 and n labels, got {data.shape} and {len(labels)}")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    classes = _cifar_class_names(path, n_classes, fine="fine_labels" in d)
    out = Path(work) / f"images-{path.name}-{_file_key(path)}"
    done = out / ".complete"
    names = [f"{i:06d}.png" for i in range(len(data))]
    if not done.exists():
        out.mkdir(parents=True, exist_ok=True)
        pixels = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CIFAR rows: R plane, G plane, B plane
        for name, px in zip(names, pixels, strict=True):
            Image.fromarray(px).save(out / name, compress_level=1)
        done.write_text(f"{len(data)}\n")
    return Dataset(str(path), "cifar", classes, str(out),
                   {pathcodec.encode(str(out / name)): int(lab) for name, lab in zip(names, labels, strict=True)})


def load_imagefolder(root: str | os.PathLike, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS) -> Dataset:
    """ROOT/<class>/**/<image>: the class is the first directory level (sorted names -> labels)."""
    root = Path(root).resolve()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"{root} has no class subdirectories: an ImageFolder tree is ROOT/<class name>/<images>")
    exts = {"." + e.lower() for e in extensions}
    labels: dict[str, int] = {}
    for i, c in enumerate(classes):
        for dirpath, dirnames, files in os.walk(root / c, followlinks=True):
            dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
            for f in sorted(files):
                if os.path.splitext(f)[1].lower() in exts and not f.startswith("."):
                    labels[pathcodec.encode(os.path.join(dirpath, f))] = i  # the reading API's text form
    if not labels:
        raise ConfigError(f"{root} has class directories but no images with the suffixes {', '.join(sorted(exts))}")
    return Dataset(str(root), "imagefolder", classes, str(root), labels)


def load_dataset(spec: str, work: str | os.PathLike) -> Dataset:
    p = Path(spec)
    if not p.exists():
        raise ConfigError(f"dataset {spec} does not exist: give a CIFAR pickle (cifar-100-python/train) or an "
                          "ImageFolder directory")
    if p.is_dir():
        if (p / "train").is_file() and (p / "meta").is_file():
            raise ConfigError(f"{spec} is a CIFAR-100 directory: give its files, --train {p / 'train'} --test {p / 'test'}")
        return load_imagefolder(p)
    return load_cifar(p, work)


# -- features ----------------------------------------------------------------------------------

def features(cfg: Config, ds: Dataset, work: str | os.PathLike, name: str,
             progress: str = "none", log=print) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(X float32 [n, dim], y int64 [n], failures) for a dataset, through the pipeline (resumable in work/)."""
    out = Path(work) / f"features-{name}"
    log(f"Embedding {len(ds):,} {name} images from {ds.source} with {cfg.infer.backend} "
        f"({cfg.model.path}) into {out} ...")
    res = embed_inputs(cfg, [ds.image_root], out, progress=progress)
    keep = [i for i, p in enumerate(res.paths) if p in ds.labels_by_path]
    x = res.embeddings[keep]
    y = np.array([ds.labels_by_path[res.paths[i]] for i in keep], dtype=np.int64)
    failures = [f for f in res.failures if f.get("path", "") in ds.labels_by_path]
    if failures:
        log(f"warning: {len(failures)} {name} images could not be embedded and are left out "
            f"(first: {failures[0].get('path')}: {failures[0].get('reason')}); see {RunDir(out).failures}")
    return x, y, failures


def align_labels(train: Dataset, test: Dataset, y_train: np.ndarray, y_test: np.ndarray) -> np.ndarray:
    """Test labels in the training set's numbering (by class name when a side is an ImageFolder);
    ConfigError if the test set has classes the training features lack (a linear probe cannot
    predict a class it never saw)."""
    if train.kind == "cifar" and test.kind == "cifar":
        mapped = y_test.copy()
    else:
        index = {c: i for i, c in enumerate(train.classes)}
        mapped = np.array([index.get(test.classes[v], -1) for v in y_test], dtype=np.int64)
    seen = set(np.unique(y_train).tolist())
    bad = np.array([v not in seen for v in mapped.tolist()], dtype=bool)
    if bad.any():
        names = sorted({test.classes[v] for v in y_test[bad].tolist()})
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} classes)" if len(names) > 8 else "")
        raise ConfigError(f"the test set {test.source} has classes absent from the training set {train.source}: "
                          f"{shown} ({int(bad.sum())} test images); a linear probe cannot predict them. "
                          "Give a training set that covers every test class")
    return mapped


# -- the linear probe --------------------------------------------------------------------------

def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int) -> Any:

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def topk_accuracy(clf: Any, x: np.ndarray, y: np.ndarray, k: int) -> float:
    proba = clf.predict_proba(x)
    k = min(k, proba.shape[1])
    top = clf.classes_[np.argsort(-proba, axis=1)[:, :k]]
    return float(np.mean(np.any(top == y[:, None], axis=1)))


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
                 c_grid: tuple[float, ...] = DEFAULT_C_GRID, val_fraction: float = 0.2, refine: bool = True,
                 max_iter: int = 1000, seed: int = 0, log=print) -> dict[str, Any]:
    """Pick C on a validation split of the training set, refit on all of it, score the test set."""
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ConfigError("scikit-learn is not installed: pip install 'clip-pipeline[eval]'") from None
    counts = np.bincount(y_train)
    stratify = y_train if counts[counts > 0].min() >= 2 else None
    x_fit, x_val, y_fit, y_val = train_test_split(x_train, y_train, test_size=val_fraction, random_state=seed,
                                                  stratify=stratify)
    sweep: dict[float, float] = {}

    def score(c: float) -> float:
        if c not in sweep:
            t = time.perf_counter()
            sweep[c] = float(np.mean(_fit(x_fit, y_fit, c, max_iter, seed).predict(x_val) == y_val))
            log(f"  C={c:<10.4g} validation top-1 {sweep[c]:.4f}  ({time.perf_counter() - t:.1f}s)")
        return sweep[c]

    for c in c_grid:
        score(c)
    best = max(sweep, key=lambda c: (sweep[c], -abs(np.log10(c))))
    if refine and len(c_grid) > 1:  # a finer step either side of the best, as CLIP's sweep narrows down
        for c in (best / 10 ** 0.5, best * 10 ** 0.5):
            score(float(f"{c:.6g}"))
        best = max(sweep, key=lambda c: (sweep[c], -abs(np.log10(c))))
    t = time.perf_counter()
    clf = _fit(x_train, y_train, best, max_iter, seed)
    fit_s = time.perf_counter() - t
    return {
        "C": best, "validation_top1": sweep[best], "sweep": {f"{c:.6g}": a for c, a in sorted(sweep.items())},
        "top1": topk_accuracy(clf, x_test, y_test, 1), "top5": topk_accuracy(clf, x_test, y_test, 5),
        "n_train": int(len(y_train)), "n_validation": int(len(y_val)), "n_test": int(len(y_test)),
        "classes": int(len(np.unique(y_train))), "final_fit_s": round(fit_s, 2),
        "solver": "lbfgs", "penalty": "l2", "max_iter": max_iter, "val_fraction": val_fraction, "seed": seed,
    }


# -- zero-shot ---------------------------------------------------------------------------------

def zero_shot_accuracy(run_dir: str | os.PathLike, x: np.ndarray, y: np.ndarray, class_names: list[str],
                       templates: list[str], *, text_model: str | None = None, backend: str = "cpu",
                       threads: int = 1, precision: str = "auto", log=print) -> dict[str, Any]:
    """Top-1/top-5 of CLIP zero-shot classification (classify's prompt ensembling and scoring) of
    features x [n, dim] from the image run in run_dir, with the text model paired with that run."""
    enc = text_encoder_for_run(run_dir, text_model, backend=backend, log=log, threads=threads, precision=precision)
    if enc.dim != x.shape[1]:
        raise ConfigError(f"image features are {x.shape[1]}-d but the text model makes {enc.dim}-d: "
                          "they do not belong together (--text-model)")
    classes = class_embeddings(lambda texts: enc.embed(texts, normalize=True).embeddings, class_names, templates)
    hits1 = hits5 = 0
    for s, (top, _, _) in zip(range(0, len(x), 65536), zero_shot(x, classes, 5, True), strict=True):
        yy = y[s:s + len(top)]
        hits1 += int(np.sum(top[:, 0] == yy))
        hits5 += int(np.sum(np.any(top == yy[:, None], axis=1)))
    return {"top1": hits1 / max(1, len(y)), "top5": hits5 / max(1, len(y)), "n_test": int(len(y)),
            "classes": len(class_names), "templates": templates, "text_model": enc.identity()}


def prompt_name(class_dir: str) -> str:
    """ImageFolder directory name -> the class name put into the prompts (`golden_retriever` -> `golden retriever`)."""
    return class_dir.replace("_", " ").strip()

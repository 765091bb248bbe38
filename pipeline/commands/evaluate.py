"""`clip-pipeline eval linear-probe | zero-shot`: accuracy of the image embeddings (pipeline/query/evaluate.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from pipeline.backends import NAMES as BACKEND_NAMES
from pipeline.backends import get_backend
from pipeline.config import Config, ConfigError
from pipeline.config import load as load_config
from pipeline.query.evaluate import (
    DEFAULT_C_GRID,
    SEED_NOTE,
    align_labels,
    features,
    linear_probe,
    load_dataset,
    prompt_name,
    zero_shot_accuracy,
)

# -- command line ------------------------------------------------------------------------------

def _eval_config(config: str | None, sets: tuple[str, ...], devices: tuple[str, ...]) -> Config:
    cfg = load_config(config, sets, devices=devices)
    return cfg.replace(run=dataclasses.replace(cfg.run, progress="none"))


def _model_note(cfg: Config) -> tuple[dict, bool]:
    try:
        ident = get_backend(cfg.infer.backend).model_identity(cfg)
    except (FileNotFoundError, OSError):
        ident = {"path": cfg.model.path}
    return ident, bool(ident.get("synthetic")) or cfg.infer.backend == "fake"


@click.group("eval", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def eval_group() -> None:
    """Accuracy of the embeddings: a linear probe (the seed's CIFAR-100 figure) and zero-shot."""


_common = [
    click.option("-c", "--config", type=click.Path(dir_okay=False), help="Pipeline config (backend, model, devices)."),
    click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config key (repeatable)."),
    click.option("-d", "--device", "devices", multiple=True, metavar="DEV", help="Device (repeatable); replaces infer.devices."),
    click.option("--work", metavar="DIR", help="Keep the extracted images and the feature runs here (resumable; "
                                               "default: a temporary directory removed at the end)."),
    click.option("--progress", type=click.Choice(["auto", "bar", "log", "none"]), default="none", show_default=True,
                 help="Progress of the feature runs."),
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
]


def _with_common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@contextlib.contextmanager
def _work_dir(work: str | None, usage_errors: tuple[type[Exception], ...] = (ConfigError,)):
    """The eval commands' working directory (a temp one unless --work) and their exit codes:
    a usage/data error -> one line, exit 2; a failed feature run (RuntimeError) -> one line, exit 4."""
    tmp = None if work else tempfile.TemporaryDirectory(prefix="clipp-eval-")
    try:
        yield Path(work or tmp.name)
    except usage_errors as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except RuntimeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(4)
    finally:
        if tmp is not None:
            tmp.cleanup()


@eval_group.command("linear-probe")
@click.option("--train", "train_spec", required=True, metavar="T",
              help="Training set: a CIFAR pickle (cifar-100-python/train) or an ImageFolder directory.")
@click.option("--test", "test_spec", required=True, metavar="V", help="Test set, same kinds.")
@click.option("--c-grid", default=",".join(f"{c:g}" for c in DEFAULT_C_GRID), show_default=True,
              help="Comma-separated C values swept on the validation split (then refined around the best).")
@click.option("--val-fraction", type=click.FloatRange(0.05, 0.5), default=0.2, show_default=True,
              help="Share of the training set held out to choose C.")
@click.option("--max-iter", type=click.IntRange(min=10), default=1000, show_default=True, help="L-BFGS iterations.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the validation split.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="BLAS/OpenMP threads for the fits (default: the libraries' own choice, all cores).")
@_with_common
def linear_probe_cmd(train_spec, test_spec, c_grid, val_fraction, max_iter, seed, threads, config, sets, devices,
                     work, progress, as_json) -> None:
    """Linear-probe accuracy: logistic regression on the image features, C chosen on a validation split.

    Exit status: 0 done; 2 bad usage or data (the message says which); 4 the feature run failed.
    """
    def log(m: str) -> None:
        click.echo(m, err=True)

    import importlib.util

    missing = [m for m in ("sklearn", "threadpoolctl") if importlib.util.find_spec(m) is None]
    if missing:  # before any image is embedded (the probe needs them only at the end)
        click.echo(f"error: eval linear-probe needs {' and '.join(missing)}, which are not installed: "
                   "pip install 'clip-pipeline[eval]'", err=True)
        sys.exit(2)
    try:
        grid = tuple(float(v) for v in c_grid.split(",") if v.strip())
        if not grid or min(grid) <= 0:
            raise ValueError
    except ValueError:
        click.echo(f"error: --c-grid {c_grid!r}: expected positive numbers separated by commas", err=True)
        sys.exit(2)
    with _work_dir(work) as wdir:
        cfg = _eval_config(config, sets, devices)
        ident, synthetic = _model_note(cfg)
        train = load_dataset(train_spec, wdir)
        test = load_dataset(test_spec, wdir)
        align_labels(train, test, np.array(sorted(set(train.labels_by_path.values()))),  # before any embedding
                     np.array(list(test.labels_by_path.values()), dtype=np.int64))
        x_tr, y_tr, f_tr = features(cfg, train, wdir, "train", progress, log)
        x_te, y_te, f_te = features(cfg, test, wdir, "test", progress, log)
        if len(y_tr) == 0 or len(y_te) == 0:
            raise ConfigError("no image of the training or test set could be embedded; see the failures above")
        if len(np.unique(y_tr)) < 2:
            raise ConfigError(f"the training set {train.source} has fewer than 2 classes; nothing to classify")
        y_te = align_labels(train, test, y_tr, y_te)
        log(f"Choosing C on a {val_fraction:.0%} validation split of {len(y_tr):,} training features:")
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=threads):
            res = linear_probe(x_tr, y_tr, x_te, y_te, c_grid=grid, val_fraction=val_fraction, max_iter=max_iter,
                               seed=seed, log=log)
    res.update({"train": train.source, "test": test.source, "backend": cfg.infer.backend,
                "model": {k: ident.get(k) for k in ("path", "sha256", "arch", "synthetic")},
                "failed_images": {"train": len(f_tr), "test": len(f_te)}, "synthetic_weights": synthetic,
                "note": SEED_NOTE})
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"linear probe: {res['n_train']:,} train / {res['n_test']:,} test images, {res['classes']} classes, "
               f"{cfg.infer.backend} backend, model {ident.get('path')}"
               + (" (SYNTHETIC random weights)" if synthetic else ""))
    click.echo(f"chosen C = {res['C']:g} (validation top-1 {res['validation_top1']:.4f} on {res['n_validation']:,} "
               "held-out training images)")
    click.echo(f"top-1 accuracy: {res['top1']:.4f}")
    click.echo(f"top-5 accuracy: {res['top5']:.4f}")
    click.echo(f"note: {SEED_NOTE}")


@eval_group.command("zero-shot")
@click.option("--test", "test_spec", required=True, metavar="V",
              help="Images with their classes: an ImageFolder directory (class = directory name, '_' read as a "
                   "space) or a CIFAR pickle (class names from its meta file).")
@click.option("--templates", type=click.Path(dir_okay=False, exists=True), default=None,
              help='Prompt templates, one per line, each with "{}" (default: "a photo of a {}.").')
@click.option("--text-model", type=click.Path(dir_okay=False), default=None,
              help="Text tower (default: the one paired with the image model, as `classify` finds it).")
@click.option("--text-backend", type=click.Choice(BACKEND_NAMES), default="cpu", show_default=True)
@click.option("--text-precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="--text-backend openvino: inference precision (auto = bf16 where the CPU has native bf16).")
@_with_common
def zero_shot_cmd(test_spec, templates, text_model, text_backend, text_precision,
                  config, sets, devices, work, progress, as_json) -> None:
    """Zero-shot accuracy: image features through the pipeline, classes from the text tower (as `classify`).

    Exit status: 0 done; 2 bad usage or data; 4 the feature run failed.
    """
    def log(m: str) -> None:
        click.echo(m, err=True)

    # the text side's TextModelError / PairingError are ValueErrors with a message: usage errors too
    with _work_dir(work, usage_errors=(ConfigError, ValueError)) as wdir:
        tmpls = ["a photo of a {}."]
        if templates:
            tmpls = [t.strip() for t in Path(templates).read_text(encoding="utf-8").splitlines() if t.strip()]
            bad = [t for t in tmpls if "{}" not in t]
            if not tmpls or bad:
                raise ConfigError(f"--templates {templates}: every line needs a {{}} for the class name"
                                  + (f" (not: {bad[0]!r})" if bad else " (the file is empty)"))
        cfg = _eval_config(config, sets, devices)
        ident, synthetic = _model_note(cfg)
        test = load_dataset(test_spec, wdir)
        x, y, failed = features(cfg, test, wdir, "test", progress, log)
        if len(y) == 0:
            raise ConfigError("no test image could be embedded; see the failures above")
        names = [prompt_name(c) for c in test.classes]
        res = zero_shot_accuracy(wdir / "features-test", x, y, names, tmpls, text_model=text_model,
                                 backend=text_backend, precision=text_precision, log=log)
    synthetic = synthetic or bool(res["text_model"].get("synthetic"))
    res.update({"test": test.source, "backend": cfg.infer.backend, "failed_images": len(failed),
                "model": {k: ident.get(k) for k in ("path", "sha256", "arch", "synthetic")},
                "synthetic_weights": synthetic})
    if as_json:
        click.echo(json.dumps(res, indent=2, default=str))
        return
    click.echo(f"zero-shot: {res['n_test']:,} images, {res['classes']} classes, {len(tmpls)} templates, "
               f"{cfg.infer.backend} backend, model {ident.get('path')}" + (" (SYNTHETIC random weights)" if synthetic else ""))
    click.echo(f"top-1 accuracy: {res['top1']:.4f}")
    click.echo(f"top-5 accuracy: {res['top5']:.4f}")
    if synthetic:
        click.echo("note: synthetic random weights: expect chance level (1/classes); real CLIP weights are needed "
                   "for meaningful zero-shot accuracy.")


COMMANDS = [eval_group]

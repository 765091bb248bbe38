"""Configuration: TOML + CLI overrides, parsed once into frozen dataclasses and validated.

Every key is declared here, with its type, default and a one-line doc (the README's
configuration reference is checked against these docs by a test). Anything a user can get
wrong raises ConfigError with a one-line message naming the key or file and what to do.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.backends import NAMES as BACKEND_NAMES
from pipeline.errors import ConfigError  # defined in a leaf module; imported from here everywhere

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "jpe", "jfif", "png", "bmp", "webp", "tif", "tiff", "gif")


def _f(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass(frozen=True)
class InputConfig:
    paths: tuple[str, ...] = _f((), "Image directories (or single files) to embed, in this order; ids follow it. Overlapping entries (the same directory twice, one inside another) are listed once, with a warning.")
    extensions: tuple[str, ...] = _f(DEFAULT_EXTENSIONS, "File suffixes (case-insensitive) listed as inputs; content is sniffed, the suffix is not trusted.")
    recursive: bool = _f(True, "Descend into subdirectories.")
    follow_symlinks: bool = _f(True, "Follow symlinked files and directories (loops are detected and skipped).")
    list: str = _f("", "A file list, listed after input.paths in its own order: a text file with one path per line (UTF-8, or the escaped form of README 'Output format'; relative paths resolve against the list's directory), or a .parquet file with a path column (needs the `parquet` extra).")
    list_column: str = _f("path", "The column of a parquet input.list that holds the paths.")
    tar: bool = _f(True, "Read .tar files (in input.paths, walked directories or input.list) as webdataset shards: one input per sample, its txt/json members as metadata; never extracted.")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = _f("out", "Output directory (manifest.json, embeddings/, failures.jsonl, report.json).")
    shard_size: int = _f(4096, "Rows per shard; a shard holds a fixed range of input ids.", min=1)
    dtype: Literal["float32", "float16"] = _f("float32", "Embedding dtype in the .npy shards.")
    normalize: bool = _f(True, "L2-normalise embeddings before writing.")
    pickle: bool = _f(False, "Also write embeddings.pkl ({'img_path': [...], 'embedding': ndarray}) at the end, like the reference program.")
    metadata: bool = _f(False, "Also write embeddings/part-NNNNN.parquet per shard, row i describing .npy row i: image_path, tar + key (webdataset inputs), caption (txt), json fields, width/height. Needs the `parquet` extra.")
    layout: Literal["native", "clip-retrieval"] = _f("native", "\"clip-retrieval\" also publishes the complete run as img_emb/img_emb_NNNNN.npy + metadata/metadata_NNNNN.parquet (hard links; implies output.metadata), what `clip-retrieval index` / autofaiss and `clip-retrieval back` read.")
    content_hash: bool = _f(False, "Record a fast content hash of every embedded input (embeddings/part-NNNNN.hashes: xxh3-128 if xxhash is installed, else blake2b-128), so that `run --update` skips new names whose bytes are already embedded (renamed or copied files).")
    on_existing: Literal["resume", "restart", "error"] = _f("resume", "What to do when the output dir holds a previous run: resume it, delete and restart, or stop.")


@dataclass(frozen=True)
class ModelConfig:
    path: str = _f("models/clip-vit-b32-synthetic.onnx", "Model file: ONNX for cpu/openvino/fake backends, bmodel for sail/sim.")
    build: Literal["", "vit-b32", "tiny", "tiny-336"] = _f("", "If set and `path` is missing, build this synthetic architecture there (random weights; embeddings carry no meaning).")
    seed: int = _f(0, "Seed of the synthetic weights (with `build`).")
    batch_size: int = _f(32, "Images per inference call; fixed-batch models (bmodels) override it with their own batch.", min=1)
    input_kind: Literal["auto", "float", "uint8"] = _f("auto", "Model input: float = CLIP-normalised NCHW float32; uint8 = NHWC pixels with normalisation folded into the model; auto = read it from the model.")
    image_size: int = _f(0, "Crop size (square) fed to the model; 0 = read it from the model (ONNX input shape, bmodel sidecar), 224 when it cannot be read. A model that takes another size is refused.", min=0, max=1024,
                         why_max="each decode worker holds crops of this side; CLIP models take 224 to 448")


@dataclass(frozen=True)
class PreprocessConfig:
    mode: Literal["reference", "fast"] = _f("reference", "reference = CLIP's exact transform (PIL bicubic; 16/32-bit integer images scaled by bit depth); fast = power-of-two DCT downscale + OpenCV resize (bicubic 2x up then integer 2x area down; plain area for factors of 2 or more) for L/LA/RGB/RGBA images, the reference crop for other modes and extreme panoramas (measured differences: README, Preprocessing fidelity).")
    exif_transpose: bool = _f(False, "Apply EXIF orientation before resizing (CLIP's reference ignores it).")
    max_pixels: int = _f(178_956_970, "Images with more pixels than this fail as too_large (checked from the header, before decoding).", min=1)
    max_file_bytes: int = _f(512 * 1024 * 1024, "Files larger than this fail as too_large without being read.", min=1)
    decode_timeout_s: float = _f(30.0, "An input whose read + decode takes longer than this fails as timeout (its decode worker is restarted); no single input can stall the run.", min=0.1)


@dataclass(frozen=True)
class WorkersConfig:
    decode: int = _f(1, "Decode worker processes.", min=1, max=1024, why_max="more processes than any host has cores")
    preprocess: int = _f(1, "Preprocess worker processes (ignored when fused).", min=1, max=1024,
                         why_max="more processes than any host has cores")
    fuse_decode_preprocess: bool = _f(True, "Run decode and preprocess in the same worker process (saves shipping full-size images between processes).")
    items_per_message: int = _f(16, "Inputs per message from the source to the decode workers and, fused, on to the infer stage (batch-sized messages cut per-message overhead; 1 = one message per image).", min=1)


@dataclass(frozen=True)
class InferConfig:
    backend: Literal[BACKEND_NAMES] = _f("cpu", "Inference backend: cpu (onnxruntime), openvino (OpenVINO on the CPU, fp32 or bf16, or int8 when asked for: [openvino]), sail (SOPHON BM1684X), sim (BM1684X simulator via TPU-MLIR), fake (deterministic stand-in for tests and benchmarks).")
    devices: tuple[Any, ...] = _f(("cpu:0",), "One inference process per entry: 'cpu:N' for cpu/openvino/fake, dev_ids (0, 1, ...) for sail/sim, or the string 'all'.")
    threads: int = _f(1, "Intra-op threads per inference process (cpu and openvino backends).", min=1)
    batch_timeout_ms: float = _f(50.0, "Flush a partial batch after waiting this long for more images.", min=0)
    overlap: bool = _f(True, "Run inference on a background thread (one batch in flight) while the infer process receives and prepares the next batch (stacking crops, or sail device mode's hardware decode + crop). Results keep their order; false = the serial loop.")


@dataclass(frozen=True)
class QueuesConfig:
    decode: int = _f(64, "Queue depth (images per peer, ZeroMQ high-water mark) into the decode workers; grouped messages of workers.items_per_message images count as that many.", min=1)
    preprocess: int = _f(16, "Queue depth into the preprocess workers.", min=1)
    infer: int = _f(128, "Queue depth (images) into each inference process: the ZeroMQ bound per pipe. With queues.dispatch = 'credit' the credit window (queues.infer_batches) is the real, tighter bound.", min=1)
    infer_batches: int = _f(1, "Batches a device may hold beyond the one it runs (credit dispatch): its window is (1 + this) x batch_size images, split over the senders feeding it. No device idles while another holds more than this.", min=0)
    dispatch: Literal["credit", "round_robin"] = _f("credit", "How work is spread over the devices: credit = each message goes to the device with the most free window (pipeline/wire/dispatch.py); round_robin = ZeroMQ's round-robin over queues.infer-deep pipes (the earlier behaviour, kept for the bench's before/after).")
    sink: int = _f(16, "Queue depth into the sink.", min=1)


@dataclass(frozen=True)
class RunConfig:
    progress: Literal["auto", "bar", "log", "none"] = _f("auto", "Progress display: auto = bar on a terminal, periodic log lines otherwise.")
    log_interval_s: float = _f(10.0, "Seconds between progress log lines (progress = log).", min=0.1)
    stall_timeout_s: float = _f(300.0, "A worker busy on one item or batch longer than this is killed and restarted.", min=1)
    max_restarts: int = _f(3, "Restarts per worker slot before the slot (a device) is taken out of the run.", min=0)
    start_timeout_s: float = _f(600.0, "How long workers may take to start (model load) before the run is aborted.", min=1)


@dataclass(frozen=True)
class FakeConfig:
    latency_ms_per_batch: float = _f(0.0, "fake backend: simulated inference time per batch.", min=0)
    dim: int = _f(512, "fake backend: embedding width.", min=1)
    fail_on_batch: int = _f(0, "fake backend: raise a device error on this batch number of each device process (0 = never).", min=0)
    hang_on_batch: int = _f(0, "fake backend: hang forever on this batch number (0 = never).", min=0)
    exit_on_batch: int = _f(0, "fake backend: exit the process hard (os._exit) on this batch number (0 = never).", min=0)
    fail_devices: tuple[str, ...] = _f((), "fake backend: devices that fail permanently on every batch.")
    slow_devices: tuple[str, ...] = _f((), "fake backend: devices that take fake.slow_factor times the latency (an uneven fleet).")
    slow_factor: float = _f(3.0, "fake backend: latency multiplier of fake.slow_devices.", min=1)
    ready_crops: bool = _f(False, "BENCH-ONLY, backends fed by host decode (fake, cpu; not sail device mode): the decode workers neither read nor decode the inputs and send one pre-made crop per input (stages/ready.py; measures orchestration at accelerator speed, or without the host's decode on cpu).")


@dataclass(frozen=True)
class SailConfig:
    mode: Literal["device", "host"] = _f("device", "sail backend: device = hardware JPEG decode + TPU preprocessing per chip; host = exact CLIP preprocessing on the CPU, only inference on the TPU.")
    resize: Literal["linear", "nearest"] = _f(
        "linear",
        "sail device mode: EngineImagePreProcess resize of the centre square -> 224: linear (BM_RESIZE_TPU_LINEAR, CLIP-TPU's choice) or nearest. "
        "'bicubic' is refused: a BM1684X resizes on its VPP, which has no bicubic, and SAIL would abort the process (docs/sail-backend.md).",
        refuse={"bicubic": "BM1684X has no bicubic resize: bmcv_image_resize runs on the VPP, which takes only nearest and linear, "
                           "and SAIL's preprocess thread aborts the whole process on the error; use \"linear\" (default) or \"nearest\""})
    runtime: Literal["chip", "cmodel"] = _f(
        "chip",
        "sail backend: chip = the installed sophon.sail on SOPHON hardware; cmodel = SOPHGO's real SAIL built by scripts/setup_sail_cmodel.sh, "
        "run on the BM1684X software model in the TPU-MLIR venv (no JPEG unit: device mode decodes on the CPU; every dev_id is the cmodel's device 0 in its own process; slow: for correctness, never speed).")
    timeout_s: float = _f(120.0, "sail device mode: longest wait for one batch from the chip's preprocess+inference threads before the device is declared hung (DeviceError, worker restarted).", min=1)


@dataclass(frozen=True)
class OpenVinoConfig:
    precision: Literal["fp32", "bf16", "int8", "auto"] = _f("auto", "openvino backend: inference precision. bf16 runs 2-4x faster than fp32 on CPUs with native bf16 (AVX512_BF16, AMX) at a cosine of ~0.9999 to fp32 (README, Fidelity); refused where bf16 would be emulated (slower than fp32). auto = bf16 where the CPU has it natively, else fp32; resolved once before start and recorded in the manifest (a resume with another precision is refused). int8 = the image tower quantised by NNCF's post-training quantisation, calibrated on openvino.calibration's photos (needs the `openvino-int8` extra; never chosen by auto; the embeddings move more than at bf16: check your weights, README Fidelity).")
    calibration: str = _f("", "openvino.precision = \"int8\": a directory of photos like the ones to embed (searched recursively for input.extensions), from which openvino.calibration_count photos calibrate the quantisation, preprocessed as the run preprocesses (preprocess.mode). The quantised model is made once, before the workers start, and kept in ~/.cache/clip-pipeline/openvino-int8/ under the model's sha256, the photos' content hash, their count, the preprocessing and the NNCF / OpenVINO versions; the manifest records which photos (a resume with others is refused).")
    calibration_count: int = _f(300, "openvino.precision = \"int8\": how many photos of openvino.calibration calibrate the quantisation (spread evenly over its sorted file names; all of them when it holds fewer). NNCF's own default subset size.", min=1)
    ir_cache: bool = _f(True, "openvino backend: convert each ONNX model to OpenVINO's own format (IR, fp32 weights: as large as the ONNX) once, kept in ~/.cache/clip-pipeline/openvino-ir/ under the model's sha256, and load that on later runs: the ONNX import is ~0.35 s of a core per inference process at every start. The same graph OpenVINO builds from the ONNX each time (embeddings bit-identical, tested); false = read the ONNX every time.")
    cache_dir: str = _f("", "openvino backend: a directory for OpenVINO's model cache (CACHE_DIR), which keeps the compiled model so that later runs load faster (a ViT-B/32 takes ~350 MB per precision). Off by default (\"\"): once in testing a cached bf16 blob gave NaN embeddings and the cause was not found (docs/performance.md).")


@dataclass(frozen=True)
class ClusterConfig:
    engine: Literal["", "ray"] = _f("", "Run across a cluster: \"ray\" = `run` drives a Ray cluster (same as --cluster ray); \"\" = this host only. Slurm arrays use `plan` / `run-range` / `merge` instead (docs/cluster.md).")
    address: str = _f("auto", "Ray cluster address for `run --cluster ray` (\"auto\" = the cluster started on this host with `ray start`; or host:port of the head).")
    range_shards: int = _f(16, "Shards per range: the unit of work one host takes (range size = range_shards x output.shard_size inputs; aim for minutes per range).", min=1)
    max_attempts: int = _f(3, "Tries per range that fail in the application (a host error, a timeout) before the run gives up on it; node deaths are retried by Ray on top.", min=1)
    range_timeout_s: float = _f(0.0, "Cancel a range attempt running longer than this and try it again (0 = no limit).", min=0)
    straggler_factor: float = _f(3.0, "Launch a duplicate of a range running longer than this many times the median range time, when a slot is free (first commit wins; 0 = never).", min=0)
    straggler_min_s: float = _f(60.0, "Never duplicate a range that has run less than this.", min=0)


@dataclass(frozen=True)
class Config:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    queues: QueuesConfig = field(default_factory=QueuesConfig)
    run: RunConfig = field(default_factory=RunConfig)
    fake: FakeConfig = field(default_factory=FakeConfig)
    sail: SailConfig = field(default_factory=SailConfig)
    openvino: OpenVinoConfig = field(default_factory=OpenVinoConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


SECTIONS: dict[str, type] = {
    name: tp for name, tp in typing.get_type_hints(Config).items() if name != "source"
}


def iter_keys() -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """Every documented key as ('section.key', field), for docs and checks."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield f"{section}.{f.name}", f


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any, meta: dict) -> Any:
    """Check `value` against the declared type `tp`; return the typed value or raise ConfigError."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, str) and value in meta.get("refuse", {}):
            raise ConfigError(f"config key {key} = {value!r} is refused: {meta['refuse'][value]}")
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is tuple:
        if isinstance(value, str) and key == "infer.devices":
            return (value,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        (elem,) = typing.get_args(tp)[:1]
        if elem is str and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key {key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):  # NaN passes every comparison
            raise ConfigError(f"config key {key}: must be a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise bad
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"config key {key}: must be >= {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"config key {key}: must be <= {meta['max']}, got {value!r} ({meta['why_max']})")
    return value


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section [{name}] must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key {name}.{unknown[0]} (known keys in [{name}]: {', '.join(known)})"
        )
    values = {k: _coerce(f"{name}.{k}", hints[k], v, dict(known[k].metadata)) for k, v in raw.items()}
    return cls(**values)


def parse_value(text: str) -> Any:
    """A `--set` value: TOML syntax if it parses (1, true, [0, 1], "x"), else a plain string."""
    import tomllib  # imported here: workers may run under Python 3.10 (no tomllib), never parsing TOML

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `section.key=value` override to a raw (dict) config, in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {assignment!r}: expected section.key=value, e.g. infer.threads=2")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(f"--set {assignment!r}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
    raw.setdefault(section, {})[key] = parse_value(text.strip())


def load_raw(path: str | os.PathLike | None) -> dict:
    if path is None:
        return {}
    import tomllib

    p = Path(path)
    try:
        with open(p, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist (see configs/ for examples)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc.strerror}") from None


def from_dict(raw: dict, source: str = "<dict>", base_dir: str | os.PathLike | None = None) -> Config:
    """Build and validate a Config from a raw dict. Relative paths resolve against base_dir (default: cwd)."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section [{unknown[0]}] in {source} (known: {', '.join(SECTIONS)})")
    sections = {name: _build_section(name, cls, raw.get(name, {})) for name, cls in SECTIONS.items()}
    cfg = Config(**sections, source=source)
    if not cfg.output.dir.strip():
        raise ConfigError("config key output.dir (--output) is empty: name the output directory")
    if any(not p.strip() for p in cfg.input.paths):
        raise ConfigError("config key input.paths (--input) holds an empty path: name a directory or file")
    return _resolve_paths(cfg, Path(base_dir) if base_dir else Path.cwd())


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def absolute(p: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    return cfg.replace(
        input=dataclasses.replace(cfg.input, paths=tuple(absolute(p) for p in cfg.input.paths),
                                  list=absolute(cfg.input.list) if cfg.input.list else "",
                                  extensions=tuple(e.lower().lstrip(".") for e in cfg.input.extensions)),
        output=dataclasses.replace(cfg.output, dir=absolute(cfg.output.dir)),
        model=dataclasses.replace(cfg.model, path=absolute(cfg.model.path)),
        openvino=dataclasses.replace(cfg.openvino, calibration=absolute(cfg.openvino.calibration)
                                     if cfg.openvino.calibration else ""),
    )


def load(path: str | os.PathLike | None, overrides: typing.Iterable[str] = (),
         **cli: Any) -> Config:
    """Load a TOML file, apply `--set` overrides and direct CLI values (e.g. input_paths=...), validate.

    Relative paths inside the file resolve against the current directory, like paths on the
    command line, so `clip-pipeline run --config configs/cpu.toml` works from the project root.
    """
    raw = load_raw(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    if cli.get("input_paths"):
        raw.setdefault("input", {})["paths"] = list(cli["input_paths"])
    if cli.get("output_dir") is not None:  # --output '' is a mistake to report, not "no --output"
        raw.setdefault("output", {})["dir"] = cli["output_dir"]
    if cli.get("devices"):
        raw.setdefault("infer", {})["devices"] = [parse_value(d) for d in cli["devices"]]
    cfg = from_dict(raw, source=str(path) if path else "<defaults>")
    return cfg


def relative_note(cfg: Config) -> str:
    """What a "does not exist" error adds when the path may have come from a config file."""
    if cfg.source in ("<defaults>", "<dict>"):
        return ""
    return (f" (a relative path in {cfg.source} resolves against the current directory, {os.getcwd()}, "
            "not against the file's)")


def _check_open_files(cfg: Config) -> None:
    """The run's processes must fit the open-file limit: the supervisor holds a few descriptors per
    worker (process handle, sockets, slot), so workers.decode in the thousands ended in EMFILE."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    w = cfg.workers
    procs = w.decode + (0 if w.fuse_decode_preprocess else w.preprocess) + len(cfg.infer.devices) + 2
    need = 64 + 8 * procs
    if soft != resource.RLIM_INFINITY and need > soft:
        raise ConfigError(f"config keys workers.decode={w.decode} / workers.preprocess={w.preprocess}: {procs} "
                          f"processes need about {need} open files, over this shell's limit of {soft}: "
                          "use fewer workers, or raise the limit (ulimit -n)")


def validate_for_run(cfg: Config, out: str | os.PathLike | None = None) -> None:
    """Checks that need the file system: inputs exist, the model exists or can be built, the run's
    directory (`out`; cfg.output.dir, the configured output, unless given) is not a file."""
    _check_open_files(cfg)
    if not cfg.input.paths and not cfg.input.list:
        raise ConfigError("config key input.paths is empty: give at least one image directory (or --input DIR), "
                          "or a file list (input.list / --list FILE)")
    if cfg.input.list:
        from pipeline.data.inputs import iter_list

        if not os.path.isfile(cfg.input.list):
            raise ConfigError(f"input list {cfg.input.list} does not exist or is not a file (config key input.list / --list)"
                              + relative_note(cfg))
        for _ in iter_list(cfg.input.list, cfg.input.list_column):  # every line checked before a worker starts
            pass
    for p in cfg.input.paths:
        if not os.path.exists(p):
            raise ConfigError(f"input path {p} does not exist (config key input.paths / --input)" + relative_note(cfg))
        if not os.access(p, os.R_OK):
            raise ConfigError(f"input path {p} is not readable (config key input.paths / --input)")
    if cfg.infer.backend != "fake" and not os.path.exists(cfg.model.path) and not cfg.model.build:
        raise ConfigError(
            f"model file {cfg.model.path} does not exist (config key model.path): "
            "point it at a model, run scripts/download.sh, or set model.build = \"vit-b32\" for synthetic weights"
            + relative_note(cfg))
    if not cfg.infer.devices:
        raise ConfigError("config key infer.devices is empty: list at least one device, e.g. [\"cpu:0\"]")
    if cfg.output.metadata or cfg.output.layout == "clip-retrieval":
        from pipeline.data.metadata import require_pyarrow

        require_pyarrow("output.metadata" if cfg.output.metadata else "output.layout")
    out = Path(cfg.output.dir if out is None else out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory (config key output.dir / --output)")

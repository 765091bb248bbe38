"""Pure parsers for TPU-MLIR tool output (no tpu_mlir import; unit-tested)."""
from __future__ import annotations

import re

_RUNTIME_RE = re.compile(r"flops:\s*(\d+),\s*runtime:\s*([0-9.]+)ms")
_TCYC_RE = re.compile(r"^TCYC\s*:\s*(\d+)", re.M)


def parse_compiler_profile(text: str, batch: int | None = None) -> dict:
    """Read the compiler's static time estimate from ``compiler_profile_0.txt``.

    The file ends with lines like ``TCYC : 496942`` and
    ``flops: 30891360, runtime: 0.496942ms, ComputationAbility: 0.062163T``. It is the code
    generator's *estimate* for the real chip, not a measurement. With several sections (subnets),
    their runtimes are summed. Returns {} when nothing is found.
    """
    hits = _RUNTIME_RE.findall(text)
    if not hits:
        return {}
    ms = sum(float(r) for _, r in hits)
    est = {
        "kind": "estimate",
        "source": "compiler_profile_0.txt (TPU-MLIR static cycle estimate for the chip; not a measurement)",
        "ms_per_batch": round(ms, 6),
        "flops": sum(int(f) for f, _ in hits),
        "sections": len(hits),
    }
    cycles = [int(c) for c in _TCYC_RE.findall(text)]
    if cycles:
        est["cycles"] = sum(cycles)
    if batch:
        est["ms_per_image"] = round(ms / batch, 6)
    return est


_NET_RE = re.compile(r"^net\s+(\d+):\s*\[(.+?)\]\s*(\w+)?", re.M)
_STAGE_RE = re.compile(r"^stage\s+(\d+)")
_TENSOR_RE = re.compile(r"^(input|output):\s*([^,]+),\s*\[([^\]]*)\],\s*(\w+)")

DTYPE_NAMES = {"float32": "float32", "uint8": "uint8", "int8": "int8", "float16": "float16",
               "int32": "int32", "uint16": "uint16", "int16": "int16", "bfloat16": "bfloat16"}


def parse_model_info(text: str) -> dict:
    """Parse ``model_tool --info X.bmodel`` into {"chip", "networks": [{"name", "static",
    "stages": [{"inputs": [...], "outputs": [...]}]}]}; tensors are {"name", "shape", "dtype"}."""
    info: dict = {"chip": None, "networks": []}
    m = re.search(r"^chip:\s*(\S+)", text, re.M)
    if m:
        info["chip"] = m.group(1).lower()
    net = stage = None
    for line in text.splitlines():
        line = line.strip()
        m = _NET_RE.match(line)
        if m:
            net = {"name": m.group(2), "static": (m.group(3) or "") == "static", "stages": []}
            info["networks"].append(net)
            stage = None
            continue
        m = _STAGE_RE.match(line)
        if m and net is not None:
            stage = {"inputs": [], "outputs": []}
            net["stages"].append(stage)
            continue
        m = _TENSOR_RE.match(line)
        if m and stage is not None:
            shape = [int(s) for s in m.group(3).split(",") if s.strip()]
            stage[m.group(1) + "s"].append(
                {"name": m.group(2).strip(), "shape": shape,
                 "dtype": DTYPE_NAMES.get(m.group(4), m.group(4))})
    return info


def stage_batches(info: dict, net: int = 0) -> list[int]:
    """Batch size (first dim of the first input) of each stage of one network, in stage order."""
    return [s["inputs"][0]["shape"][0] for s in info["networks"][net]["stages"]]

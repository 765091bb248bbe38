#!/usr/bin/env python3
"""Read an output's clip-retrieval layout with clip-retrieval's own metadata readers.

    VENV/bin/python tests/clip_retrieval_readers.py OUT TMPDIR

Runs in the private venv of scripts/setup_clip_retrieval_venv.sh (clip-retrieval 2.45.0, pandas,
h5py, pyarrow, numpy<2), never imports this project. For every id 0..n-1 (n = rows of img_emb/)
it asks each reader of `clip_retrieval.clip_back` for `url` and `image_path`:

    parquet  ParquetMetadataProvider(OUT/metadata)            (clip back's default)
    hdf5     parquet_to_hdf5 + Hdf5MetadataProvider           (clip back --enable_hdf5)
    arrow    ArrowMetadataProvider over one arrow IPC file per metadata parquet (clip back
             --use_arrow; the files converted one to one, as its docs ask of the user)
    dataset  pyarrow.dataset over OUT/metadata (what pyarrow-based tools read)

and prints one JSON object {reader: [[url, image_path], ...] or "error: ..."} with null for a
missing value (hdf5 stores a null string as "", pandas as None or NaN).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

COLS = ["url", "image_path"]


def _norm(v):
    if isinstance(v, bytes):
        v = v.decode()
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return None
    return str(v)


def _package_without_init() -> None:
    """Make `clip_retrieval` importable without running its package __init__, which imports every
    command (clip_inference: torch, all_clip, ...); clip_back and its ivf_metadata_ordering then
    load from the installed files as usual."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("clip_retrieval")
    pkg = types.ModuleType("clip_retrieval")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["clip_retrieval"] = pkg


def main() -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as pds
    import pyarrow.parquet as pq

    _package_without_init()
    from clip_retrieval.clip_back import (
        ArrowMetadataProvider,
        Hdf5MetadataProvider,
        ParquetMetadataProvider,
        meta_to_dict,
        parquet_to_hdf5,
    )

    out, tmp = Path(sys.argv[1]), Path(sys.argv[2])
    meta = out / "metadata"
    n = sum(np.load(p, mmap_mode="r").shape[0] for p in sorted((out / "img_emb").glob("*.npy")))
    ids = np.arange(n)

    def parquet():
        return ParquetMetadataProvider(str(meta)).get(ids, COLS)

    def hdf5():
        parquet_to_hdf5(str(meta), str(tmp / "metadata.hdf5"), COLS)
        return [meta_to_dict(m) for m in Hdf5MetadataProvider(str(tmp / "metadata.hdf5")).get(ids, COLS)]

    def arrow():
        (tmp / "arrow").mkdir(exist_ok=True)
        for f in sorted(meta.glob("*.parquet")):
            tbl = pq.read_table(f)
            with pa.ipc.new_file(str(tmp / "arrow" / f"{f.stem}.arrow"), tbl.schema) as w:
                w.write_table(tbl)
        return ArrowMetadataProvider(str(tmp / "arrow")).get(ids, COLS)

    def dataset():
        return pds.dataset(str(meta), format="parquet").to_table(columns=COLS).to_pylist()

    res: dict[str, object] = {"rows": int(n)}
    for name, fn in (("parquet", parquet), ("hdf5", hdf5), ("arrow", arrow), ("dataset", dataset)):
        try:
            res[name] = [[_norm(m.get(c)) for c in COLS] for m in fn()]
        except Exception as exc:  # noqa: BLE001 - reported, the test names the reader that failed
            res[name] = f"error: {type(exc).__name__}: {exc}"
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-shard parquet metadata aligned to the .npy rows, and clip-retrieval's output layout.

With `output.metadata = true` every shard gets `embeddings/part-NNNNN.parquet`, row i describing
row i of `part-NNNNN.npy` (failed inputs have no row in either):

    image_path  the input's path, pathcodec's one-line text form (a tar member: TAR/MEMBER)
    tar, key    the tar shard and the sample's key, for webdataset inputs (null otherwise)
    caption     the sample's txt member (UTF-8), null when none
    width, height  the stored image's size, read from its header (null if it cannot be read)
    <json keys> the top-level keys of the sample's json member, one column each (as clip-retrieval
                flattens metadata); keys named like the columns above are dropped (ours win);
                nested values are JSON text; a key whose values mix types in a shard is JSON text

Every parquet file of a complete run has the same columns and types (`unify`, run by `RunDir.publish_layout`):
the union of every shard's columns (ours first, then json keys in first-seen shard order), null
where a shard has no value, and a key whose type differs between shards JSON text everywhere.
clip-retrieval's readers need this: `clip back --enable_hdf5` appends each file's columns to one
hdf5 dataset per column, so a column missing from one file shifts every later row of it (another
row's URL), and pyarrow/arrow readers take the first file's schema.

The sink writes the parquet with the shard (a companion renamed before the .npy); when a run
completes, RunDir.publish (pipeline/data/rundir.py, which writes every file of the layout)
backfills any that are missing (a run resumed with metadata newly switched on) with
`parquet_bytes`. With `output.layout = "clip-retrieval"` the completed run also holds
`img_emb/img_emb_NNNNN.npy` (a hard link to the shard's .npy: same bytes, no copy) and
`metadata/metadata_NNNNN.parquet` for every shard with rows: what `clip-retrieval index` (autofaiss
over img_emb/) and `clip-retrieval back` (every metadata/*.parquet, sorted by name, concatenated)
read. Numbers are zero-padded so that name order is row order.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.data import inputs
from pipeline.wire import pathcodec

OWN_COLUMNS = ("image_path", "tar", "key", "caption", "width", "height")


def require_pyarrow(key: str) -> None:
    """ConfigError naming the key and the extra when pyarrow is missing."""
    from pipeline.errors import ConfigError

    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError(f"config key {key} writes parquet, which needs pyarrow: "
                          "pip install 'clip-pipeline[parquet]'") from None


def _size(data_or_path: bytes | io.BytesIO) -> tuple[int | None, int | None]:
    from PIL import Image

    try:
        with Image.open(data_or_path) as img:
            return img.width, img.height
    except Exception:  # noqa: BLE001 - metadata is best effort: null size, never a failed run
        return None, None


def row(path: bytes, reader: inputs.TarReader) -> dict[str, Any]:
    """The metadata of one embedded input (see the module doc for the columns)."""
    rec: dict[str, Any] = {"image_path": pathcodec.encode(path), "tar": None, "key": None, "caption": None,
                           "width": None, "height": None}
    ref = inputs.split_ref(path) if b".tar/" in path.lower() else None
    if ref is None:
        rec["width"], rec["height"] = _size(os.fsdecode(path))
        return rec
    tar, name = ref
    rec["tar"] = pathcodec.encode(tar)
    rec["key"] = pathcodec.encode(inputs.split_key(name)[0])
    try:
        index, _s, m = reader.sample(path)
        if m is not None:
            data = reader.read_member(index, m, 1 << 31)
            rec["width"], rec["height"] = _size(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - best effort, as above
        pass
    side = reader.sidecars(path)
    if "txt" in side:
        rec["caption"] = side["txt"].decode("utf-8", "replace")
    if "json" in side:
        try:
            meta = json.loads(side["json"])
        except ValueError:
            meta = None
        if isinstance(meta, dict):
            for k, v in meta.items():
                if k not in OWN_COLUMNS:
                    rec[f"{k}"] = v
    return rec


def table(rows: list[dict[str, Any]]):
    """A pyarrow Table of the rows: our columns first, json keys after in first-seen order."""
    import pyarrow as pa

    cols: dict[str, list[Any]] = {c: [] for c in OWN_COLUMNS}
    for r in rows:
        for k in r:
            cols.setdefault(k, [])
    for name, values in cols.items():
        values.extend(r.get(name) for r in rows)
    arrays = {}
    for name, values in cols.items():
        if name in ("width", "height"):
            arrays[name] = pa.array(values, type=pa.int32())
        elif name in OWN_COLUMNS:
            arrays[name] = pa.array(values, type=pa.string())
        else:
            kinds = {type(v) for v in values if v is not None}
            if len(kinds) == 1 and kinds <= {int, float, str, bool}:
                try:
                    arrays[name] = pa.array(values)
                    continue
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                    pass
            arrays[name] = pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())
    return pa.table(arrays)


def parquet_bytes(paths: list[bytes], reader: inputs.TarReader | None = None) -> bytes:
    """The parquet file of one shard, in memory (written by the caller with the shard)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    own = reader is None
    reader = reader or inputs.TarReader()
    try:
        tbl = table([row(p, reader) for p in paths])
    finally:
        if own:
            reader.close()
    sink = pa.BufferOutputStream()
    pq.write_table(tbl, sink)
    return sink.getvalue().to_pybytes()


def unified_schema(schemas: list):
    """One schema for every parquet file of a run (see the module doc)."""
    import pyarrow as pa

    names: list[str] = list(OWN_COLUMNS)
    types: dict[str, set] = {}
    for schema in schemas:
        for field in schema:
            if field.name not in names:
                names.append(field.name)
            kinds = types.setdefault(field.name, set())
            if not pa.types.is_null(field.type):
                kinds.add(field.type)
    fields = []
    for name in names:
        kinds = types.get(name, set())
        if name in ("width", "height"):
            typ = pa.int32()
        elif name in OWN_COLUMNS or len(kinds) != 1:
            typ = pa.string()  # none seen (all null) or types that differ: text, as inside a shard
        else:
            typ = next(iter(kinds))
        fields.append(pa.field(name, typ))
    return pa.schema(fields)


def conform(tbl, schema):
    """`tbl` with exactly `schema`'s columns: missing ones null, a differing type as JSON text."""
    import pyarrow as pa

    cols = []
    for field in schema:
        if field.name not in tbl.column_names:
            cols.append(pa.nulls(tbl.num_rows, field.type))
            continue
        col = tbl.column(field.name)
        if col.type == field.type:
            cols.append(col)
        elif pa.types.is_null(col.type) or field.type != pa.string():
            cols.append(col.cast(field.type))
        else:
            cols.append(pa.array([None if v is None else json.dumps(v) for v in col.to_pylist()],
                                 type=pa.string()))
    return pa.Table.from_arrays(cols, schema=schema)


def unify(paths: list[Path], write: Callable[[Path, bytes], None]) -> int:
    """Rewrite, with `write` (the run directory's atomic write), the parquet files among `paths`
    whose schema is not the run's one schema; returns how many were rewritten. Reads only the
    footers of the files that already fit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(p) for p in paths]
    schema = unified_schema(schemas)
    rewritten = 0
    for path, own in zip(paths, schemas):
        if own.remove_metadata().equals(schema):
            continue
        sink = pa.BufferOutputStream()
        pq.write_table(conform(pq.read_table(path), schema), sink)
        write(path, sink.getvalue().to_pybytes())
        rewritten += 1
    return rewritten

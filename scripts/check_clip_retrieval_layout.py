#!/usr/bin/env python3
"""Check an output written with output.layout = "clip-retrieval" the way clip-retrieval uses it.

    python3 scripts/check_clip_retrieval_layout.py OUT

Runs under any interpreter with autofaiss (and its pandas) installed; it does not import this
project. `clip-retrieval index` is `autofaiss.build_index(embeddings=OUT/img_emb, ...)` plus a copy
of OUT/metadata (clip_retrieval/clip_index.py); `clip-retrieval back` reads the metadata as
`pd.concat(pd.read_parquet(f) for f in sorted(glob("metadata/*.parquet")))` and maps index ids
to those rows (ParquetMetadataProvider). Checks: the index holds every row, the metadata has one
row per embedding, and each row's nearest neighbour in the index is itself with the metadata
path of that row. Prints one JSON line; exit 1 on a mismatch.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    import numpy as np
    import pandas as pd
    from autofaiss import build_index

    out = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        index, _infos = build_index(embeddings=str(out / "img_emb"), index_path=f"{tmp}/image.index",
                                    index_infos_path=f"{tmp}/image.json", max_index_memory_usage="1G",
                                    current_memory_available="2G", verbose=40)
    meta = pd.concat(pd.read_parquet(f) for f in sorted((out / "metadata").glob("*.parquet")))
    emb = np.concatenate([np.load(f) for f in sorted((out / "img_emb").glob("*.npy"))]).astype("float32")
    _d, ids = index.search(emb, 1)
    self_hits = int((ids[:, 0] == np.arange(len(emb))).sum())
    res = {"index_rows": int(index.ntotal), "embedding_rows": len(emb), "metadata_rows": len(meta),
           "nearest_is_self": self_hits, "columns": list(meta.columns),
           "first_path": str(meta.iloc[int(ids[0, 0])]["image_path"]) if len(meta) else None}
    print(json.dumps(res))
    ok = res["index_rows"] == res["embedding_rows"] == res["metadata_rows"] == self_hits
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Text-side benchmark: tokenizer prompts/s (one core), text embedding on the CPU vs the model-only ceiling.

    python3 scripts/bench_text.py [--model models/clip-text-vitb32-synthetic.onnx] [--prompts 512]
                                  [--repeats 3] [--json scripts/bench/results/text-cpu.json]

Cases, run interleaved `--repeats` times in one invocation (medians reported, so ratios compare
runs that saw the same background load):
  tokenizer  prompts/s of `Tokenizer.tokenize` on short prompts ("a photo of a {class}." style),
             single thread; cold = a fresh tokenizer (word cache empty), warm = the same prompts again
  ceiling    the text model alone: onnxruntime fed pre-tokenised int32 ids, same threads and batch
  embed      `TextEncoder.embed`: tokenise + infer + gather/project + L2-normalise, the code path
             of `clip-pipeline embed-text`; timed batch by batch in alternation with the ceiling
  --openvino both again on the openvino backend at fp32 and at bf16, in every repeat after onnxruntime
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = ("apple aquarium fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
           "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
           "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn mower leopard lion lizard lobster "
           "man maple tree motorcycle mountain mouse mushroom oak tree orange orchid otter palm tree pear pickup truck "
           "pine tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
           "skyscraper snail snake spider squirrel streetcar sunflower sweet pepper table tank telephone television tiger "
           "tractor train trout tulip turtle wardrobe whale willow tree wolf woman worm").split()
TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
             "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
             "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
             "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
             "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.")


def short_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES).format(rng.choice(CLASSES)) for _ in range(n)]


def bench_tokenizer(n: int) -> dict:
    from pipeline.text.tokenizer import Tokenizer

    prompts = short_prompts(n)
    tok = Tokenizer()
    t0 = time.perf_counter()
    tok(prompts)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok(prompts)
    warm = time.perf_counter() - t0
    return {"prompts": n, "cold_prompts_per_s": n / cold, "warm_prompts_per_s": n / warm, "ftfy": tok.info()["ftfy"]}


def bench_interleaved(model: str, prompts: list[str], batch: int, threads: int, backend: str = "cpu",
                      precision: str = "auto") -> tuple[float, float]:
    """(ceiling prompts/s, embed prompts/s), timed batch by batch in alternation (ABBA) so both see
    the same background load: the ceiling runs the model on pre-tokenised int32 ids; embed is
    TextEncoder.embed on the same prompts (tokenise, infer, gather/project, L2-normalise)."""
    from pipeline.text.embed import TextEncoder

    enc = TextEncoder(model, backend=backend, threads=threads, batch_size=batch, precision=precision)
    sess = enc.session
    ids = enc.tokenizer(prompts).ids
    sess.run_ids(ids[:batch])  # warm-up (model load excluded from both)
    enc.embed(prompts[:batch])
    t_ceiling = t_embed = 0.0
    for k, i in enumerate(range(0, len(prompts), batch)):
        for which in ((0, 1) if k % 2 == 0 else (1, 0)):  # ABBA: neither always runs first
            t0 = time.perf_counter()
            if which == 0:
                sess.run_ids(ids[i:i + batch])
                t_ceiling += time.perf_counter() - t0
            else:
                enc.embed(prompts[i:i + batch])
                t_embed += time.perf_counter() - t0
    return len(prompts) / t_ceiling, len(prompts) / t_embed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/clip-text-vitb32-synthetic.onnx")
    ap.add_argument("--prompts", type=int, default=512, help="prompts per embedding run")
    ap.add_argument("--token-prompts", type=int, default=50_000, help="prompts per tokenizer run")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-model", action="store_true", help="tokenizer only")
    ap.add_argument("--openvino", action="store_true",
                    help="also the openvino backend at fp32 and bf16, interleaved with onnxruntime in every repeat")
    ap.add_argument("--json", dest="json_path")
    a = ap.parse_args()

    load0 = list(os.getloadavg())
    runs: dict[str, list] = {"tokenizer": [], "ceiling": [], "embed": []}
    prompts = short_prompts(a.prompts, seed=1)
    if not a.skip_model and not Path(a.model).exists():
        from pipeline.text.model import build_clip_text_onnx

        print(f"building {a.model} (synthetic weights)", file=sys.stderr)
        build_clip_text_onnx(a.model, arch="vit-b32")
    for r in range(a.repeats):
        runs["tokenizer"].append(bench_tokenizer(a.token_prompts))
        if not a.skip_model:
            c, e = bench_interleaved(a.model, prompts, a.batch, a.threads)
            runs["ceiling"].append(c)
            runs["embed"].append(e)
            for prec in ("fp32", "bf16") if a.openvino else ():
                c, e = bench_interleaved(a.model, prompts, a.batch, a.threads, "openvino", prec)
                runs.setdefault(f"ov_{prec}_ceiling", []).append(c)
                runs.setdefault(f"ov_{prec}_embed", []).append(e)
                print(f"  openvino {prec}: ceiling {c:.1f}/s, embed {e:.1f}/s", file=sys.stderr)
        print(f"repeat {r + 1}/{a.repeats}: tokenizer {runs['tokenizer'][-1]['cold_prompts_per_s']:,.0f} prompts/s cold"
              + ("" if a.skip_model else f", ceiling {runs['ceiling'][-1]:.1f}/s, embed {runs['embed'][-1]:.1f}/s"),
              file=sys.stderr)

    med = statistics.median
    res = {
        "schema": "clip-pipeline-bench-text/1",
        "loadavg_start": load0, "loadavg_end": list(os.getloadavg()),
        "cpus": len(os.sched_getaffinity(0)),
        "tokenizer": {
            "cold_prompts_per_s": med(r["cold_prompts_per_s"] for r in runs["tokenizer"]),
            "warm_prompts_per_s": med(r["warm_prompts_per_s"] for r in runs["tokenizer"]),
            "prompts": a.token_prompts, "ftfy": runs["tokenizer"][0]["ftfy"],
        },
    }
    if not a.skip_model:
        ratios = [e / c for e, c in zip(runs["embed"], runs["ceiling"])]
        res["text_cpu"] = {"model": a.model, "batch": a.batch, "threads": a.threads, "prompts": a.prompts,
                           "ceiling_prompts_per_s": med(runs["ceiling"]), "embed_prompts_per_s": med(runs["embed"]),
                           "embed_over_ceiling": med(ratios), "runs": {"ceiling": runs["ceiling"], "embed": runs["embed"]}}
        if a.openvino:
            from pipeline.backends.openvino import engine_identity

            def per_run(x: str, y: str) -> float:  # median of the per-repeat ratios (same load)
                return med(p / q for p, q in zip(runs[x], runs[y]))

            res["text_openvino"] = {
                "engine": engine_identity("bf16"),
                **{f"{k}_prompts_per_s": med(runs[k]) for k in runs if k.startswith("ov_")},
                "bf16_embed_over_onnxruntime_fp32_embed": per_run("ov_bf16_embed", "embed"),
                "bf16_embed_over_openvino_fp32_embed": per_run("ov_bf16_embed", "ov_fp32_embed"),
                "bf16_embed_over_bf16_ceiling": per_run("ov_bf16_embed", "ov_bf16_ceiling"),
                "runs": {k: runs[k] for k in runs if k.startswith("ov_")}}
    print(json.dumps(res, indent=2))
    if a.json_path:
        Path(a.json_path).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

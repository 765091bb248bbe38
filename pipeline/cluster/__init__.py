"""Running one embedding job across many hosts: a deterministic plan, id-range runs with a
commit-if-absent protocol, and a verifying merge (Slurm arrays by hand, or the Ray driver).

    OUT/plan/plan.json            the plan record (written last by `clip-pipeline plan`)
    OUT/plan/listing.jsonl        the input listing, same format as a run's listing.jsonl
    OUT/attempts/r-RRRRR/ATTEMPT/ an attempt-private run directory (a normal run dir) per try
    OUT/ranges/r-RRRRR.json       the commit record of range r, created only if absent
    OUT/embeddings/, listing.jsonl, failures.jsonl, report.json, manifest.json
                                  the normal layout, published by `clip-pipeline merge`
                                  (manifest.json last)

See docs/cluster.md.
"""

"""clip-pipeline: CLIP image embeddings at scale on SOPHON TPUs, CPUs and GPUs."""

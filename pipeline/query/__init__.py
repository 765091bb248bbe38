"""Reading finished runs: search, faiss index, evaluation, inspect and report."""

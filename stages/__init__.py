"""Pipeline stages: source, decode, preprocess, infer, sink — pure cores plus a run loop."""

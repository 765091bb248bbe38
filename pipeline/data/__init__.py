"""Inputs and the run directory: image decoding and crops, input lists and tar shards, the output layout, metadata."""

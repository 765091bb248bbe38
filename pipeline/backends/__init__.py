"""Device-specific parts of the pipeline, behind one small interface (base.Backend)."""

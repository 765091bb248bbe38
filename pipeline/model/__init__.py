"""Model files: identity, image size, and the synthetic model builder."""

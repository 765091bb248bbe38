"""`clip-pipeline serve`: finished runs searched over HTTP (clip-retrieval's clip-back API and our own page)."""

"""Build hook: put CLIP's tokenizer vocab into the package at set-up (see pipeline/text/vocab.py).

`pip install -e .` and wheel builds run build_py, which fetches the open_clip_torch wheel with
`pip download --no-deps` (never torch), takes `open_clip/bpe_simple_vocab_16e6.txt.gz` out of it,
checks its sha256 and writes it to pipeline/text/data/. A file already there with the right
sha256 is kept (no download). If the fetch fails (offline), the install still succeeds: image
embedding does not need the vocab, and the text commands then say in one line how to fetch it
(`clip-pipeline fetch-vocab [--wheel FILE]`). CLIP_PIPELINE_SKIP_VOCAB=1 skips the fetch.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _vocab_module():
    # loaded by file path: the package's dependencies are not installed in the build environment
    spec = importlib.util.spec_from_file_location("_clip_pipeline_vocab", HERE / "pipeline" / "text" / "vocab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithVocab(build_py):
    def run(self):
        if os.environ.get("CLIP_PIPELINE_SKIP_VOCAB") != "1":
            vocab = _vocab_module()
            dest = HERE / "pipeline" / "text" / "data" / vocab.VOCAB_NAME
            try:
                vocab.fetch(dest)
                print(f"clip-pipeline: CLIP vocab ready at {dest} (sha256 checked)", file=sys.stderr)
            except vocab.VocabError as exc:
                print(f"clip-pipeline: warning: tokenizer vocab not fetched: {exc}", file=sys.stderr)
        super().run()


setup(cmdclass={"build_py": BuildPyWithVocab})

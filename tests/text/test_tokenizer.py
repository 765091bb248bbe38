"""CLIP tokenizer: golden ids, padding/truncation, special literals, parity with two independent implementations, vocab fetch."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.text import vocab
from pipeline.text.tokenizer import EOT, SOT, Tokenizer, TokenizerError, get_tokenizer
from tests.open_clip_helpers import open_clip_module
from tests.text_strings import varied_prompts

REPO = Path(__file__).resolve().parents[2]

GOLDEN = {
    # from the issue (and open_clip / OpenAI clip.tokenize)
    "a photo of a dog.": [SOT, 320, 1125, 539, 320, 1929, 269, EOT],
    "Hi there": [SOT, 1883, 997, EOT],
    "A person riding a motorcycle": [SOT, 320, 2533, 6765, 320, 10297, EOT],
    # instant-clip-tokenizer's README/tests
    "How are you?": [SOT, 829, 631, 592, 286, EOT],
    "hello world!!!": [SOT, 3306, 1002, 995, EOT],
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer()


def row(res, i=0) -> list[int]:
    return res.ids[i, : int(min(res.lengths[i], res.context_length))].tolist()


def test_golden_rows(tok):
    res = tok(list(GOLDEN))
    assert res.ids.dtype == np.int32 and res.ids.shape == (len(GOLDEN), 77)
    for i, (text, ids) in enumerate(GOLDEN.items()):
        assert row(res, i) == ids, text
        assert not res.ids[i, len(ids):].any()  # zero padding
    assert tok.decode(res.ids[0]) == "a photo of a dog ."


def test_vocab_layout(tok):
    assert len(tok.encoder) == 49408
    assert tok.encoder["<|startoftext|>"] == SOT and tok.encoder["<|endoftext|>"] == EOT
    assert tok.encoder["!"] == 0 and tok.encoder["!</w>"] == 256


def test_empty_and_whitespace_prompts(tok):
    res = tok(["", "   \t\n ", "&nbsp;"])
    for i in range(3):
        assert row(res, i) == [SOT, EOT]
    assert res.eot_positions.tolist() == [1, 1, 1]


def test_truncation_keeps_eot_last(tok):
    long = " ".join(["word"] * 100)
    res = tok([long, "short"])
    assert res.lengths[0] == 102 and res.truncated == [0]
    assert res.ids[0, 0] == SOT and res.ids[0, 76] == EOT
    assert (res.ids[0, 1:76] == tok.encoder["word</w>"]).all()
    assert res.eot_positions.tolist() == [76, 2]
    with pytest.raises(TokenizerError, match="prompt 1 needs 102 tokens"):
        tok([long], truncate=False)
    exact = " ".join(["word"] * 75)  # 75 + sot + eot = 77: fits, not truncated
    assert tok([exact]).truncated == []


def test_literal_special_tokens_do_not_move_the_eot_pick(tok):
    for text in ["a <|endoftext|> b", "<|startoftext|>x<|endoftext|>", "<|ENDOFTEXT|> dog"]:
        res = tok([text])
        ids = res.ids[0]
        assert (ids == EOT).sum() == 1 and (ids == SOT).sum() == 1
        assert int(np.argmax(ids)) == int(res.eot_positions[0])  # CLIP's argmax pick = the real end


def test_ftfy_is_optional_and_recorded(tok):
    plain = Tokenizer(use_ftfy=False)
    assert plain.info()["ftfy"] is None
    pytest.importorskip("ftfy")
    assert tok.info()["ftfy"]
    ascii_text = "A photo of a dog, 3 cats & co."
    assert plain(ascii_text).ids.tolist() == tok(ascii_text).ids.tolist()
    curly = "it’s ｆｕｌｌ"  # ftfy: curly quote -> ', full-width -> ASCII
    assert plain(curly).ids.tolist() != tok(curly).ids.tolist()
    assert row(tok(curly)) == row(tok("it's full"))


def test_ftfy_shortcut_is_exact():
    """The tokenizer skips ftfy for text its shortcut pattern accepts: ftfy must leave such text
    unchanged, up to line breaks (\r\n -> \n), which the whitespace clean-up collapses anyway."""
    ftfy = pytest.importorskip("ftfy")
    from pipeline.text.tokenizer import _FTFY_NOOP

    checked = 0
    for s in varied_prompts(3000, seed=7, html=True) + ["a\tb\r\nc", "x\x0by", "&amp;", "\x1b[31mred"]:
        if _FTFY_NOOP.fullmatch(s):
            assert ftfy.fix_text(s).split() == s.split(), repr(s)
            checked += 1
    assert checked > 150


def test_parity_with_instant_clip_tokenizer(tok):
    """5,000 varied prompts: our BPE + word split give the Rust implementation's ids exactly.

    instant-clip-tokenizer only lower-cases (no ftfy/html step), so it gets our cleaned text;
    the clean-up itself is checked against open_clip below.
    """
    ict = pytest.importorskip("instant_clip_tokenizer", reason="instant-clip-tokenizer not installed (pip install -e '.[test]')")
    prompts = varied_prompts(5000, seed=0)
    assert len(set(prompts)) > 4500
    ours = tok(prompts)
    assert 100 < len(ours.truncated) < 1000 and any(ord(c) > 0x1F000 for p in prompts for c in p)
    theirs = ict.Tokenizer().tokenize_batch([tok.clean(p) for p in prompts], 77).astype(np.int32)
    bad = np.flatnonzero((ours.ids != theirs).any(axis=1))
    assert bad.size == 0, f"{bad.size} prompts differ, first {prompts[bad[0]]!r}"


def test_parity_with_open_clip_tokenizer(tok):
    """5,000 varied prompts (with HTML entities) through open_clip's own tokenizer: identical ids."""
    oc = open_clip_module("tokenizer")
    prompts = varied_prompts(5000, seed=1, html=True)
    ours = tok(prompts)
    if tok.info()["ftfy"] is None:
        pytest.skip("ftfy is not installed; open_clip always uses it")
    theirs = oc.SimpleTokenizer()(prompts).numpy().astype(np.int32)
    bad = np.flatnonzero((ours.ids != theirs).any(axis=1))
    assert bad.size == 0, f"{bad.size} prompts differ, first {prompts[bad[0]]!r}"
    assert len(ours.truncated) > 100


# -- the vocab file ------------------------------------------------------------------------------
def _wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
    return path


@pytest.fixture(scope="module")
def vocab_bytes() -> bytes:
    data, _ = vocab.load_checked()
    return data


def test_fetch_from_a_wheel_checks_sha256(tmp_path, vocab_bytes):
    good = _wheel(tmp_path / "open_clip_torch-3.3.0-py3-none-any.whl", vocab.SOURCE_MEMBER, vocab_bytes)
    dest = tmp_path / "v" / vocab.VOCAB_NAME
    assert vocab.fetch(dest, wheel=good) == dest
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == vocab.VOCAB_SHA256
    assert Tokenizer(dest)("Hi there").ids[0, :4].tolist() == GOLDEN["Hi there"]

    tampered = _wheel(tmp_path / "bad.whl", vocab.SOURCE_MEMBER, vocab_bytes[:-1] + bytes([vocab_bytes[-1] ^ 1]))
    with pytest.raises(vocab.VocabError, match="is not CLIP's bpe_simple_vocab_16e6.txt.gz"):
        vocab.fetch(tmp_path / "w" / vocab.VOCAB_NAME, wheel=tampered)
    assert not (tmp_path / "w" / vocab.VOCAB_NAME).exists()
    other = _wheel(tmp_path / "other.whl", "x/y.txt", b"x")
    with pytest.raises(vocab.VocabError, match="has no member open_clip/bpe_simple_vocab_16e6.txt.gz"):
        vocab.fetch(tmp_path / "w" / vocab.VOCAB_NAME, wheel=other)


def test_a_wrong_vocab_file_is_refused(tmp_path):
    bad = tmp_path / vocab.VOCAB_NAME
    bad.write_bytes(b"not the vocab")
    with pytest.raises(vocab.VocabError, match="fetch-vocab"):
        Tokenizer(bad)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=120)


def test_missing_vocab_is_one_clear_line(tmp_path):
    r = _cli("tokenize", "hi", env={"CLIP_PIPELINE_VOCAB": str(tmp_path / "nope.gz")})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fetch-vocab" in lines[0] and "nope.gz" in lines[0]


def test_fetch_vocab_command_offline(tmp_path, vocab_bytes):
    wheel = _wheel(tmp_path / "open_clip_torch-3.3.0-py3-none-any.whl", vocab.SOURCE_MEMBER, vocab_bytes)
    dest = tmp_path / "out" / vocab.VOCAB_NAME
    r = _cli("fetch-vocab", "--wheel", str(wheel), "--dest", str(dest))
    assert r.returncode == 0, r.stderr
    assert dest.is_file() and "checked" in r.stdout
    r = _cli("tokenize", "--json", "a photo of a dog.", env={"CLIP_PIPELINE_VOCAB": str(dest)})
    assert r.returncode == 0 and '"ids": [49406, 320, 1125, 539, 320, 1929, 269, 49407]' in r.stdout

"""Seeded, varied prompts for tokenizer parity tests (unicode, emoji, digits, punctuation, long)."""

from __future__ import annotations

import random

WORDS = (
    "a photo of the dog cat car plane bird truck apple banana person riding motorcycle sunset over "
    "mountains close-up blurry bright dark small large red green blue yellow picture drawing sketch "
    "painting rendition origami toy plushie tattoo sculpture embroidered cartoon pixelated jpeg "
    "corrupted low-resolution good bad itap black-and-white cropped weird hard-to-see clean dirty "
    "aquarium_fish sweet_pepper maple_tree pickup_truck lawn-mower hello world how are you there "
    "Don't it's we're they've I'm you'll he'd O'Neil rock'n'roll can't won't SHOUTING MiXeD CaSe "
    "e-mail U.S.A. Dr. Mr. Mrs. St. etc. vs. i.e. e.g. #hashtag @user http://example.com/a?b=c&d=e "
    "www.site.org user_name file.jpg x86_64 v1.2.3 COVID-19 T-shirt 3D 4K HDR 1080p 24/7 50% $9.99 "
    "€100 £5 ¥300 °C 10km/h 3.14159 1,000,000 2nd 3rd 21st 1990s '90s"
).split()

UNICODE = (
    "café naïve résumé façade coöperate jalapeño Ångström Ærø Øresund straße Größe ĳssel ŒUVRE "
    "Ελληνικά λέξη ΟΔΟΣ русский текст Привет мир українська Ёлка 日本語 東京タワー カタカナ ひらがな "
    "中文 北京 你好 한국어 서울 العربية مرحبا עברית שלום हिन्दी नमस्ते ไทย สวัสดี বাংলা தமிழ் "
    "Tiếng_Việt ąęśćżźń İstanbul ıİ ǅ ǈ ﬁ ﬂ ﬀ ｆｕｌｌ ＷＩＤＴＨ ①②③ ½ ¼ ² ³ ⁴ ٣ ۴ ४ ๕ 〇 Ⅻ ⅷ"
).split()

EMOJI = (
    "😀 😂 🥲 🐶 🐱 🚗 ✈️ 🍎 🍌 🏍️ 🌅 👍 👍🏽 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 🇯🇵 ❤️ ☕ ⭐ 🔥 💯 🎉 ™ © ® ✓ ✗ → ← ⇒ ∞ ≈ ≠ ≤ ≥ "
    "± × ÷ • … — – ‘quoted’ “double” «guillemets» „low“ ¿qué? ¡sí! ※ § ¶ † ‡"
).split()

PUNCT = list("!\"#$%'()*+,-./:;=?@[\\]^_`{}~") + ["...", "!!!", "?!", "--", "::", "()", "[]", "{}", "''", "\"\""]

SPACES = [" ", " ", " ", "  ", "\t", "\n", " \n ", "\u00a0", "\u2003", "\r\n"]


def _word(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.55:
        w = rng.choice(WORDS)
    elif r < 0.75:
        w = rng.choice(UNICODE)
    elif r < 0.85:
        w = rng.choice(EMOJI)
    elif r < 0.92:
        w = str(rng.choice([0, 7, 42, 100, 1984, 2024, 123456789, rng.randrange(10**12)]))
    else:
        w = rng.choice(PUNCT)
    if rng.random() < 0.1:
        w += rng.choice(PUNCT)
    if rng.random() < 0.05:
        w = w.upper()
    elif rng.random() < 0.05:
        w = w.capitalize()
    return w


def varied_prompts(n: int = 5000, seed: int = 0, html: bool = False) -> list[str]:
    """n prompts; about 5% are long (over 77 tokens); with html, some carry HTML entities.

    None contains a literal "<|startoftext|>" or "<|endoftext|>" (handled differently on purpose).
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.05:
            k = rng.randrange(60, 140)  # long: past the context
        elif kind < 0.1:
            k = rng.randrange(0, 2)  # empty or one word
        else:
            k = rng.randrange(2, 16)
        parts = []
        for _ in range(k):
            parts.append(_word(rng))
            parts.append(rng.choice(SPACES) if rng.random() < 0.9 else "")
        s = "".join(parts)
        if rng.random() < 0.3:
            s = rng.choice(["a photo of a ", "A photo of the ", "itap of a ", "a bad photo of the "]) + s + rng.choice(["", ".", "!", " ."])
        if html and rng.random() < 0.1:
            s += rng.choice([" &amp; ", " &lt;b&gt; ", " &quot;x&quot; ", " &#39;s ", " &amp;amp; ", " &nbsp;", " & co"])
        if i % 997 == 0:
            s = "  " + s + " \t "
        out.append(s)
    return out

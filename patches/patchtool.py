"""Fork-and-patch tool: the root ``net.py`` / ``params.json`` are ``DOSnet/`` + the numbered diffs in ``patches/``.

    python patches/patchtool.py check             # apply the series to copies; fail unless equal to the root files
    python patches/patchtool.py refresh           # rewrite the top patch so the series reproduces the root files
    python patches/patchtool.py new NAME "What and why"  # record current root changes as a new patch on top
    python patches/patchtool.py apply             # (re)write the root files from DOSnet/ + series

``patches/series`` lists patch files in order (blank lines and ``#`` comments ignored). Each patch is
a unified diff over the two files (paths ``a/net.py``, ``b/params.json``) preceded by a free-text
header saying what it changes and why. The diffs are applied by this script (exact context
match), so no external ``patch`` program is needed.
"""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCH_DIR = ROOT / "patches"
FILES = ("net.py", "params.json")  # patched files: DOSnet/<name> -> <name>
HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(Exception):
    pass


def read_series(patch_dir: Path = PATCH_DIR) -> list[Path]:
    series = patch_dir / "series"
    if not series.exists():
        return []
    names = [ln.strip() for ln in series.read_text().splitlines()]
    return [patch_dir / n for n in names if n and not n.startswith("#")]


def split_patch(text: str) -> tuple[str, dict[str, list[str]]]:
    """Return (header, {file name: diff lines}) for a multi-file unified diff."""
    lines = text.splitlines(keepends=True)
    header, diffs, current = [], {}, None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            name = lines[i + 1][4:].strip().split("\t")[0]
            name = name[2:] if name.startswith("b/") else name
            if name not in FILES:
                raise PatchError(f"patch touches {name!r}; only {FILES} may be patched")
            current = diffs.setdefault(name, [])
            i += 2
            continue
        if current is None:
            header.append(line)
        else:
            current.append(line)
        i += 1
    return "".join(header), diffs


def apply_diff(old: str, diff_lines: list[str], name: str) -> str:
    src = old.splitlines(keepends=True)
    out, pos, i = [], 0, 0
    while i < len(diff_lines):
        m = HUNK_RE.match(diff_lines[i])
        if not m:
            if diff_lines[i].strip():
                raise PatchError(f"{name}: unexpected line in diff: {diff_lines[i]!r}")
            i += 1
            continue
        start = int(m.group(1)) - (0 if m.group(2) == "0" else 1)
        i += 1
        old_chunk, new_chunk = [], []
        while i < len(diff_lines) and not HUNK_RE.match(diff_lines[i]):
            line = diff_lines[i]
            tag, body = line[:1], line[1:]
            if tag == " ":
                old_chunk.append(body)
                new_chunk.append(body)
            elif tag == "-":
                old_chunk.append(body)
            elif tag == "+":
                new_chunk.append(body)
            elif line.startswith("\\"):
                raise PatchError(f"{name}: files must end with a newline")
            i += 1
        if start < pos or src[start:start + len(old_chunk)] != old_chunk:
            raise PatchError(f"{name}: hunk at line {start + 1} does not apply (context differs)")
        out.extend(src[pos:start])
        out.extend(new_chunk)
        pos = start + len(old_chunk)
    out.extend(src[pos:])
    return "".join(out)


def make_diff(old: str, new: str, name: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"a/{name}", tofile=f"b/{name}", n=3))


def base_texts(root: Path = ROOT) -> dict[str, str]:
    return {n: (root / "DOSnet" / n).read_text() for n in FILES}


def apply_series(texts: dict[str, str], patches: list[Path]) -> dict[str, str]:
    texts = dict(texts)
    for p in patches:
        _, diffs = split_patch(p.read_text())
        for name, lines in diffs.items():
            try:
                texts[name] = apply_diff(texts[name], lines, name)
            except PatchError as exc:
                raise PatchError(f"{p.name}: {exc}") from None
    return texts


def diff_against_root(texts: dict[str, str], root: Path = ROOT) -> str:
    return "".join(make_diff(texts[n], (root / n).read_text(), n) for n in FILES)


def check(root: Path = ROOT, patch_dir: Path = PATCH_DIR) -> list[str]:
    """Names of root files that differ from DOSnet/ + series (empty list: all equal)."""
    result = apply_series(base_texts(root), read_series(patch_dir))
    return [n for n in FILES if result[n] != (root / n).read_text()]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "check"
    try:
        series = read_series()
        if cmd == "check":
            bad = check()
            if bad:
                print(f"patches: root {', '.join(bad)} differ from DOSnet/ + patches/series; run 'make patches'")
                return 1
            print(f"patches: {len(series)} patch(es) reproduce the root files byte for byte")
            return 0
        if cmd == "apply":
            result = apply_series(base_texts(), series)
            for n in FILES:
                (ROOT / n).write_text(result[n])
            print(f"patches: root files written from DOSnet/ + {len(series)} patch(es)")
            return 0
        if cmd == "refresh":
            if not series:
                if not diff_against_root(base_texts()):
                    print("patches: series is empty and the root files equal DOSnet/: nothing to do")
                    return 0
                print("patches: the series is empty; start one with: python patches/patchtool.py new NAME 'what and why'")
                return 1
            below = apply_series(base_texts(), series[:-1])
            header, _ = split_patch(series[-1].read_text())
            series[-1].write_text(header + diff_against_root(below))
            print(f"patches: refreshed {series[-1].name}")
            return 0 if not check() else 1
        if cmd == "new":
            if len(argv) < 3:
                raise PatchError("usage: patchtool.py new NAME 'what and why'")
            name, what = argv[1], argv[2]
            name = name if name.endswith(".patch") else name + ".patch"
            top = apply_series(base_texts(), series)
            body = diff_against_root(top)
            if not body:
                raise PatchError("the root files already equal DOSnet/ + series: nothing to record")
            (PATCH_DIR / name).write_text(what.rstrip() + "\n\n" + body)
            with open(PATCH_DIR / "series", "a") as fh:
                fh.write(name + "\n")
            print(f"patches: recorded {name}")
            return 0
        raise PatchError(f"unknown command {cmd!r}; use check, refresh, new or apply")
    except PatchError as exc:
        print(f"patches: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

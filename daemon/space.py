"""The search space inside a file: marked editable regions, and holding an agent's edit to them.

A lab's rloop.toml names editable files; a search space may narrow a file to the regions marked in it
with comment lines:

    # rloop: begin editable hparams optimizer
    LEARNING_RATE = 2e-3
    # rloop: end editable
    WARMUP = 100                                 # fixed: outside every region
    # rloop: begin editable optimizer
    def make_optimizer(model): ...
    # rloop: end editable optimizer

Grammar: a marker is a line whose text, stripped of surrounding whitespace, is
`<comment> rloop: begin editable [NAME ...]` or `<comment> rloop: end editable [NAME ...]`, where
`<comment>` is `#`, `//`, `--`, `;` or `%`, names match `[A-Za-z0-9_.-]+` and are separated by whitespace,
and the whitespace after the comment and around the colon is free (`#rloop:begin editable x` counts).
A line that mentions `rloop:` and `begin`/`end` (any case) but is not exactly a marker is an error, so a
typo never silently widens or narrows the space. Regions do not nest; every begin has an end; names on
an end line are optional and, when given, equal the begin's (as a set). A region has names or none.

Which regions are in force is the search space's choice: `True` (all of them, named or not), a list of
names (regions with at least one of them; unnamed regions only under `True`), or nothing (`False`,
`None`, empty: no region). Above, `["hparams"]` puts only the first region in force; `["optimizer"]` both.

`check(old, new, names)` holds an agent's new version to the regions in force of the last accepted one.
Its fixed parts are every line not inside the body of a region in force: text outside regions, every
marker line, and the bodies of regions not in force. They must come back byte for byte; what cannot
be kept is reverted (see `Checked`). Files are bytes, split after each b"\\n" (a b"\\r\\n" stays
whole), and need not be UTF-8: lines are decoded, with replacement, only to find markers.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass

_MARKER = re.compile(r"(?:#|//|--|;|%)\s*rloop\s*:\s*(begin|end)\s+editable((?:\s+[A-Za-z0-9_.-]+)*)")
_MENTION = re.compile(r"rloop\s*:", re.IGNORECASE)
_VERB = re.compile(r"(?<![a-z])(?:begin|end)", re.IGNORECASE)

Names = bool | list[str] | frozenset[str] | None


class RegionError(ValueError):
    """Markers that do not parse; str(e) is one line: "line N: what is wrong" (N is 1-based)."""


@dataclass(frozen=True)
class Region:
    names: frozenset[str]  # empty: an unnamed region
    begin: int  # 0-based index of the begin marker line
    end: int  # 0-based index of the end marker line; the body is lines begin+1 .. end-1


@dataclass(frozen=True)
class Checked:
    data: bytes  # what the file must hold now
    ok: bool  # new changed nothing outside the regions in force
    found: str  # "" when ok, else one line saying what was wrong


def _lines(data: bytes) -> list[bytes]:
    """Lines with their endings, split after b"\\n" only (bytes.splitlines would also split at a lone b"\\r")."""
    parts = data.split(b"\n")
    return [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _marker(line: bytes) -> tuple[str, frozenset[str], str] | None:
    """("begin" | "end", names, text) for a marker line, ("malformed", {}, text) for a near miss, else None."""
    if b"rloop" not in line.lower():  # the cheap test that nearly every line fails
        return None
    text = line.decode("utf-8", errors="replace").strip()
    match = _MARKER.fullmatch(text)
    if match:
        return match[1], frozenset(match[2].split()), text
    if _MENTION.search(text) and _VERB.search(text):
        return "malformed", frozenset(), text
    return None


def _show(names: frozenset[str]) -> str:
    return " ".join(sorted(names)) or "(unnamed)"


def parse(data: bytes) -> list[Region]:
    """The regions marked in a file, in order; `RegionError` when the markers do not pair up.

    Example:
        parse(b"x = 1\\n# rloop: begin editable lr\\nLR = 3e-4\\n# rloop: end editable\\n")
        == [Region(frozenset({"lr"}), 1, 3)]
    """
    regions: list[Region] = []
    opened: tuple[int, frozenset[str]] | None = None
    for index, line in enumerate(_lines(data)):
        marker = _marker(line)
        if marker is None:
            continue
        kind, names, text = marker
        number = index + 1
        if kind == "malformed":
            raise RegionError(f"line {number}: malformed marker {text[:80]!r} "
                              f"(expected '<comment> rloop: begin|end editable [NAME ...]')")
        if kind == "begin":
            if opened is not None:
                raise RegionError(f"line {number}: a region begins inside the region begun at line "
                                  f"{opened[0] + 1} (regions do not nest)")
            opened = (index, names)
            continue
        if opened is None:
            raise RegionError(f"line {number}: 'end editable' without a 'begin editable' before it")
        if names and names != opened[1]:
            raise RegionError(f"line {number}: the end names ({_show(names)}) differ from those of the begin "
                              f"at line {opened[0] + 1} ({_show(opened[1])})")
        regions.append(Region(opened[1], opened[0], index))
        opened = None
    if opened is not None:
        raise RegionError(f"line {opened[0] + 1}: the region begun here is never closed")
    return regions


def in_force(region: Region, names: Names) -> bool:
    """Whether the search space's choice `names` puts `region` in force.

    Example: in_force(Region(frozenset({"lr"}), 0, 2), ["lr", "depth"]) is True; with [] or False it is not.
    """
    if names is True:
        return True
    if not names:
        return False
    if isinstance(names, str):  # one name, not its letters
        names = [names]
    return not region.names.isdisjoint(names)


def has_markers(data: bytes) -> bool:
    """Whether any line is a marker or looks like one (so `parse` has something to say about the file)."""
    return b"rloop" in data.lower() and any(_marker(line) is not None for line in _lines(data))


def _split(lines: list[bytes], regions: list[Region]) -> tuple[list[list[bytes]], list[list[bytes]], list[int]]:
    """The fixed chunks around `regions` (one more than the regions), their bodies, and each chunk's first line."""
    fixed, bodies, starts, start = [], [], [], 0
    for region in regions:
        fixed.append(lines[start:region.begin + 1])
        bodies.append(lines[region.begin + 1:region.end])
        starts.append(start)
        start = region.end
    fixed.append(lines[start:])
    starts.append(start)
    return fixed, bodies, starts


def _first_change(old: list[bytes], new: list[bytes]) -> int | None:
    """The 0-based index of the first line that differs, or None when the lists are equal."""
    if old == new:
        return None
    return next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))


def check(old: bytes, new: bytes | None, names: Names) -> Checked:
    """Hold `new` (the agent's version, None if it deleted the file) to the regions of `old` in force.

    `old` is the last accepted version and parses. The result's data is `new` when it changed only
    inside the regions in force; else, when those regions' markers are intact in `new`, `old`'s fixed
    parts around `new`'s region bodies (the edits inside the regions survive); else `old` whole.
    Checking the result's data against `old` again is always ok.

    Example:
        old = b"A = 1\\n# rloop: begin editable\\nB = 2\\n# rloop: end editable\\n"
        check(old, old.replace(b"B = 2", b"B = 3"), True).ok is True
        check(old, old.replace(b"1", b"9").replace(b"2", b"3"), True).data
        == old.replace(b"B = 2", b"B = 3")  # the edit outside is reverted, the one inside kept
    """
    if new is None:
        return Checked(old, False, "the file was deleted")
    if new == old:
        return Checked(old, True, "")
    old_lines, new_lines = _lines(old), _lines(new)
    old_force = [r for r in parse(old) if in_force(r, names)]
    if not old_force:
        line = _first_change(old_lines, new_lines) or 0
        return Checked(old, False, f"line {line + 1} changed outside the editable regions (none is in force)")
    try:
        new_force = [r for r in parse(new) if in_force(r, names)]
    except RegionError as e:
        return Checked(old, False, f"the region markers were changed or removed: {e}")
    if [r.names for r in new_force] != [r.names for r in old_force]:
        before, after = (", ".join(_show(r.names) for r in force) or "none" for force in (old_force, new_force))
        return Checked(old, False, f"the region markers were changed or removed: the regions in force were "
                                   f"[{before}], now [{after}]")
    old_fixed, _, _ = _split(old_lines, old_force)
    new_fixed, new_bodies, new_starts = _split(new_lines, new_force)
    for old_chunk, new_chunk, start in zip(old_fixed, new_fixed, new_starts, strict=True):
        line = _first_change(old_chunk, new_chunk)
        if line is not None:
            kept = old_fixed[0] + [ln for body, chunk in zip(new_bodies, old_fixed[1:], strict=True)
                                   for ln in body + chunk]
            return Checked(b"".join(kept), False, f"line {start + line + 1} changed outside the editable regions")
    return Checked(new, True, "")


def editable_lines(data: bytes, names: Names) -> set[int]:
    """1-based numbers of the lines inside the bodies of the regions in force (`RegionError` if unparsable).

    Example: editable_lines(b"# rloop: begin editable\\nLR = 1\\n# rloop: end editable\\n", True) == {2}
    """
    return {n for r in parse(data) if in_force(r, names) for n in range(r.begin + 2, r.end + 1)}


def literal_assignments(tree: ast.Module) -> Iterable[tuple[str, ast.stmt]]:
    """Module-level `NAME = literal` and `NAME: T = literal` statements: the constants lab.read_constants reads
    and built-in policies set (lab.py uses this too)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, value = node.target.id, node.value
        else:
            continue
        try:
            ast.literal_eval(value)
        except ValueError:
            continue
        yield name, node


def constants_in_force(source: bytes, names: Names, constants: Iterable[str]) -> set[str]:
    """Those of `constants` whose every module-level literal assignment lies wholly inside a region in force.

    Built-in search policies may set only these. A source whose Python or markers do not parse gives set().

    Example:
        constants_in_force(b"# rloop: begin editable\\nLR = 1e-3\\n# rloop: end editable\\nDEPTH = 4\\n",
                           True, ["LR", "DEPTH"]) == {"LR"}
    """
    try:
        lines = editable_lines(source, names)
        # Python ends a line at a lone b"\r" too; a space there keeps ast's line numbers equal to ours.
        tree = ast.parse(re.sub(rb"\r(?!\n)", b" ", source))
    except (RegionError, SyntaxError, ValueError):
        return set()
    wanted, inside, outside = set(constants), set(), set()
    for name, node in literal_assignments(tree):
        if name in wanted:
            whole = all(n in lines for n in range(node.lineno, (node.end_lineno or node.lineno) + 1))
            (inside if whole else outside).add(name)
    return inside - outside


def not_constants(source: bytes, names: Names) -> str:
    """"" when every statement inside the regions in force is a module-level `NAME = literal` (comments and
    blank lines aside), else one line naming the first that is not: a space declared with `constants = true`
    (the reference lab's `hparams`) holds the code fixed and lets the agent change values only.

    Example: not_constants(b"# rloop: begin editable\\nimport os\\n# rloop: end editable\\n", True)
             == "line 2: only constant assignments (NAME = literal) may change here"
    """
    try:
        lines = editable_lines(source, names)
        tree = ast.parse(re.sub(rb"\r(?!\n)", b" ", source))
    except RegionError as e:
        return f"the region markers do not parse: {e}"
    except (SyntaxError, ValueError) as e:
        return f"the file does not parse: {getattr(e, 'msg', e)}"
    constant = {id(node) for _, node in literal_assignments(tree)}
    for node in tree.body:
        span = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        if any(n in lines for n in span) and id(node) not in constant:
            return f"line {node.lineno}: only constant assignments (NAME = literal) may change here"
    return ""

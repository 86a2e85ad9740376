"""Marked editable regions: parsing the markers, which are in force, and holding an agent's edit to them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rloopd.space import (
    Checked,
    Region,
    RegionError,
    check,
    constants_in_force,
    editable_lines,
    has_markers,
    in_force,
    parse,
)

TRAIN = b"""import torch
# rloop: begin editable hparams optimizer
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 0.1
# rloop: end editable
DEPTH = 4
# rloop: begin editable optimizer
def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
# rloop: end editable optimizer
# rloop: begin editable
SEED = 0
# rloop: end editable
print("done")
"""


def error_line(data: bytes) -> str:
    with pytest.raises(RegionError) as e:
        parse(data)
    assert "\n" not in str(e.value)
    return str(e.value).split(":")[0]


# --- parsing ---

def test_parse_finds_regions_in_order():
    assert parse(TRAIN) == [
        Region(frozenset({"hparams", "optimizer"}), 1, 4),
        Region(frozenset({"optimizer"}), 6, 9),
        Region(frozenset(), 10, 12),
    ]


@pytest.mark.parametrize("begin, end", [
    (b"# rloop: begin editable a b", b"# rloop: end editable"),
    (b"#rloop:begin editable a b", b"#rloop:end editable b a"),
    (b"   #   rloop :  begin   editable\ta   b  ", b"# rloop: end editable a b"),
    (b"// rloop: begin editable a b", b"// rloop: end editable"),
    (b"-- rloop: begin editable a b", b"-- rloop: end editable"),
    (b"; rloop: begin editable a b", b"; rloop: end editable"),
    (b"% rloop: begin editable a b", b"% rloop: end editable"),
])
def test_marker_spellings(begin, end):
    assert parse(b"x\n" + begin + b"\nbody\n" + end + b"\ny\n") == [Region(frozenset({"a", "b"}), 1, 3)]


def test_names_may_hold_dots_dashes_and_underscores():
    data = b"# rloop: begin editable opt.lr block-2 x_y\n# rloop: end editable\n"
    assert parse(data)[0].names == {"opt.lr", "block-2", "x_y"}


def test_a_file_without_markers_has_no_regions():
    assert parse(b"x = 1\n# a comment about loops\n") == []
    assert not has_markers(b"x = 1\n# a comment about loops\n")
    assert has_markers(TRAIN)
    assert has_markers(b"# rloop: begin editabel\n")  # a near miss counts: parse() will say what is wrong


@pytest.mark.parametrize("data, line", [
    (b"a\n# rloop: begin editable\nb\n# rloop: begin editable\n# rloop: end editable\n", "line 4"),  # nested
    (b"a\nb\n# rloop: end editable\n", "line 3"),  # end without begin
    (b"a\n# rloop: begin editable\nb\n", "line 2"),  # never closed
    (b"# rloop: begin editable a\nb\n# rloop: end editable b\n", "line 3"),  # end names differ
    (b"# rloop: begin editable a b\nb\n# rloop: end editable a\n", "line 3"),  # a subset is not equal
    (b"x\n# rloop: begin editabel\n", "line 2"),  # typo
    (b"x\n# rloop: begin\n", "line 2"),
    (b"x\n# RLOOP: BEGIN EDITABLE\n", "line 2"),
    (b"x\n## rloop: begin editable\n", "line 2"),  # not one of the comment prefixes
    (b"x\ny\n# rloop: begin editable a,b\n", "line 3"),  # not a name
    (b"x\n# rloop: endeditable\n", "line 2"),
])
def test_bad_markers_name_the_line(data, line):
    assert error_line(data) == line


def test_malformed_marker_message():
    with pytest.raises(RegionError, match=r"^line 1: malformed marker"):
        parse(b"# rloop: begin editabel\n")


def test_lines_that_only_mention_rloop_are_not_markers():
    assert parse(b"# rloop: the search space is below\n# see the rloop docs to begin\n") == []


# --- regions in force ---

def test_in_force():
    named, unnamed = Region(frozenset({"a", "b"}), 0, 1), Region(frozenset(), 2, 3)
    assert in_force(named, True) and in_force(unnamed, True)
    assert in_force(named, ["b", "z"]) and in_force(named, frozenset({"a"}))
    assert not in_force(named, ["z"]) and not in_force(unnamed, ["a"])
    for none in (False, None, [], frozenset()):
        assert not in_force(named, none) and not in_force(unnamed, none)


def test_editable_lines():
    assert editable_lines(TRAIN, True) == {3, 4, 8, 9, 12}
    assert editable_lines(TRAIN, ["hparams"]) == {3, 4}
    assert editable_lines(TRAIN, ["optimizer"]) == {3, 4, 8, 9}
    assert editable_lines(TRAIN, False) == set()


# --- checking an edit ---

def test_unchanged_is_ok():
    assert check(TRAIN, TRAIN, True) == Checked(TRAIN, True, "")
    assert check(TRAIN, TRAIN, False).ok


def test_edit_inside_a_region_is_kept():
    new = TRAIN.replace(b"2e-3", b"3e-3")
    assert check(TRAIN, new, ["hparams"]) == Checked(new, True, "")


def test_adding_and_removing_lines_inside_regions_is_ok():
    new = TRAIN.replace(b"WEIGHT_DECAY = 0.1\n", b"WEIGHT_DECAY = 0.05\nBETA2 = 0.95\nEPS = 1e-8\n")
    new = new.replace(b"SEED = 0\n", b"")
    assert check(TRAIN, new, True) == Checked(new, True, "")


def test_edit_outside_is_reverted_and_edit_inside_survives():
    new = TRAIN.replace(b"2e-3", b"3e-3").replace(b"DEPTH = 4", b"DEPTH = 8")
    result = check(TRAIN, new, True)
    assert not result.ok
    assert result.found == "line 6 changed outside the editable regions"
    assert result.data == TRAIN.replace(b"2e-3", b"3e-3")


def test_line_number_is_that_of_the_new_version():
    new = TRAIN.replace(b"SEED = 0\n", b"SEED = 0\nMORE = 1\n").replace(b'print("done")', b"print()")
    result = check(TRAIN, new, True)
    assert result.found == "line 15 changed outside the editable regions"
    assert result.data == TRAIN.replace(b"SEED = 0\n", b"SEED = 0\nMORE = 1\n")


def test_regions_not_in_force_are_fixed():
    new = TRAIN.replace(b"return torch", b"return my")
    assert check(TRAIN, new, ["optimizer"]).ok
    result = check(TRAIN, new.replace(b"2e-3", b"1e-3"), ["hparams"])
    assert not result.ok and result.found == "line 9 changed outside the editable regions"
    assert result.data == TRAIN.replace(b"2e-3", b"1e-3")


def test_unnamed_regions_only_under_true():
    new = TRAIN.replace(b"SEED = 0", b"SEED = 1")
    assert check(TRAIN, new, True).ok
    for names in (["hparams", "optimizer"], False, None, []):
        assert check(TRAIN, new, names).data == TRAIN


def test_no_region_in_force_makes_every_change_a_violation():
    new = TRAIN.replace(b"2e-3", b"3e-3")
    result = check(TRAIN, new, ["nothing"])
    assert result == Checked(TRAIN, False, "line 3 changed outside the editable regions (none is in force)")


@pytest.mark.parametrize("edit", [
    lambda d: d.replace(b"# rloop: end editable optimizer\n", b""),  # marker deleted
    lambda d: d.replace(b"begin editable hparams optimizer", b"begin editable hparams"),  # renamed
    lambda d: d.replace(b"begin editable hparams optimizer", b"begin editable everything"),  # renamed away
    lambda d: d.replace(b"# rloop: begin editable\n", b"# rloop: begin editable mine\n"),  # unnamed named
    lambda d: d.replace(b"DEPTH = 4\n", b"DEPTH = 4\n# rloop: begin editable\n# rloop: end editable\n"),  # added
    lambda d: d.replace(b"SEED = 0\n", b"# rloop: begin editable x\n"),  # nested
    lambda d: d.replace(b"SEED = 0\n", b"# rloop: end editable\n"),  # unbalanced
])
def test_changed_markers_revert_the_whole_file(edit):
    new = edit(TRAIN.replace(b"2e-3", b"3e-3"))
    result = check(TRAIN, new, True)
    assert result.data == TRAIN and not result.ok
    assert result.found.startswith("the region markers were changed or removed: ")
    assert "\n" not in result.found


def test_a_new_region_not_in_force_is_a_violation_too():
    new = TRAIN.replace(b"2e-3", b"3e-3").replace(b"DEPTH = 4\n", b"# rloop: begin editable x\nDEPTH = 4\n"
                                                                    b"# rloop: end editable\n")
    result = check(TRAIN, new, ["hparams"])
    assert not result.ok and result.data == TRAIN.replace(b"2e-3", b"3e-3")


def test_deleted_file_is_restored():
    assert check(TRAIN, None, True) == Checked(TRAIN, False, "the file was deleted")


def test_other_comment_styles():
    old = b"-- config\n-- rloop: begin editable\nSELECT 1;\n-- rloop: end editable\nSELECT 2;\n"
    assert check(old, old.replace(b"1", b"42"), True).ok
    assert check(old, old.replace(b"2", b"42"), True).data == old
    js = b"const a = 1;\n// rloop: begin editable lr\nconst lr = 3e-4;\n// rloop: end editable lr\n"
    assert check(js, js.replace(b"3e-4", b"1e-3"), ["lr"]).ok
    assert check(js, js.replace(b"const a = 1", b"let a = 1"), ["lr"]).data == js


def test_crlf_is_kept_byte_for_byte():
    old = TRAIN.replace(b"\n", b"\r\n")
    assert parse(old) == parse(TRAIN)
    new = old.replace(b"2e-3", b"3e-3").replace(b"DEPTH = 4", b"DEPTH = 8")
    result = check(old, new, True)
    assert result.data == old.replace(b"2e-3", b"3e-3") and b"\r\n" in result.data
    assert result.data.count(b"\r\n") == old.count(b"\r\n") and b"\n" not in result.data.replace(b"\r\n", b"")
    lf_line = old.replace(b"DEPTH = 4\r\n", b"DEPTH = 4\n")  # only the line ending changed: still a change
    assert check(old, lf_line, True).data == old


def test_a_lone_carriage_return_is_not_a_line_break():
    old = b"a\rb\n# rloop: begin editable\nx\n# rloop: end editable\n"
    assert parse(old) == [Region(frozenset(), 1, 3)]
    assert editable_lines(old, True) == {3}


def test_non_utf8_bytes_outside_markers_are_fine():
    old = b"\xff\xfe latin-1: caf\xe9\n# rloop: begin editable\nname = 'caf\xe9'\n# rloop: end editable\n\x80\n"
    new = old.replace(b"caf\xe9'", b"\xc0\xc1'")
    assert check(old, new, True) == Checked(new, True, "")
    assert check(old, new.replace(b"\x80", b"\x81"), True) == Checked(
        new, False, "line 5 changed outside the editable regions")


def test_last_line_without_newline():
    old = b"# rloop: begin editable\nx\n# rloop: end editable"
    assert check(old, b"# rloop: begin editable\ny\nz\n# rloop: end editable", True).ok
    assert check(old, old + b"\n", True).data == old


# --- constants policies may set ---

def test_constants_in_force():
    source = TRAIN + b"BATCH: int = 32\n"
    wanted = ["LEARNING_RATE", "WEIGHT_DECAY", "DEPTH", "SEED", "BATCH", "MISSING"]
    assert constants_in_force(source, True, wanted) == {"LEARNING_RATE", "WEIGHT_DECAY", "SEED"}
    assert constants_in_force(source, ["hparams"], wanted) == {"LEARNING_RATE", "WEIGHT_DECAY"}
    assert constants_in_force(source, ["optimizer"], ["LEARNING_RATE"]) == {"LEARNING_RATE"}
    assert constants_in_force(source, False, wanted) == set()


def test_constants_must_lie_wholly_and_only_inside():
    source = (b"# rloop: begin editable\nA = (1,\n# rloop: end editable\n     2)\n"  # starts inside, ends outside
              b"# rloop: begin editable\nB: float = 1.0\nC = 1\n# rloop: end editable\n"
              b"C = 2\n"  # assigned again outside: a policy setting C would not stay inside
              b"# rloop: begin editable\nD = some_call()\n# rloop: end editable\n")  # not a literal
    assert constants_in_force(source, True, ["A", "B", "C", "D"]) == {"B"}


def test_constants_of_unparsable_source():
    assert constants_in_force(b"# rloop: begin editable\nLR = (\n# rloop: end editable\n", True, ["LR"]) == set()
    assert constants_in_force(b"# rloop: begin editable\nLR = 1\n", True, ["LR"]) == set()  # markers broken


def test_constants_with_crlf_and_lone_cr():
    source = b"X = 1\r# note\r\n# rloop: begin editable\r\nLR = 1\r\n# rloop: end editable\r\n"
    assert constants_in_force(source, True, ["LR", "X"]) == {"LR"}


# --- properties ---

NAMES = ["a", "b", "c"]
plain_line = st.binary(max_size=12).filter(lambda b: b"\n" not in b and b"rloop" not in b.lower())
ending = st.sampled_from([b"\n", b"\r\n"])
selection = st.one_of(st.just(True), st.lists(st.sampled_from(NAMES), min_size=1, max_size=2),
                      st.sampled_from([False, None, [], ["z"]]))


@st.composite
def marker(draw, kind: str, names: tuple[str, ...]) -> bytes:
    prefix = draw(st.sampled_from(["#", "//", "--", ";", "%"]))
    space = draw(st.sampled_from(["", " ", "  "]))
    shown = names if kind == "begin" or draw(st.booleans()) else ()
    return f"{space}{prefix}{space}rloop:{space} {kind} editable {' '.join(shown)}".encode()


@st.composite
def lab_file(draw) -> list[tuple[str, object]]:
    """Segments: ("text", lines) or ("region", (begin, body lines, end))."""
    segments = []
    for _ in range(draw(st.integers(0, 4))):
        segments.append(("text", draw(st.lists(plain_line, max_size=3))))
        names = tuple(draw(st.lists(st.sampled_from(NAMES), max_size=2, unique=True)))
        segments.append(("region", (draw(marker("begin", names)), draw(st.lists(plain_line, max_size=3)),
                                    draw(marker("end", names)))))
    segments.append(("text", draw(st.lists(plain_line, max_size=3))))
    return segments


def build(segments, eol: bytes, last_eol: bool = True) -> bytes:
    lines = []
    for kind, part in segments:
        lines += part if kind == "text" else [part[0], *part[1], part[2]]
    data = b"".join(line + eol for line in lines)
    return data if last_eol or not data else data[:-len(eol)]


def rebody(segments, names, draw) -> list:
    """The same file with every region in force given a new body."""
    out = []
    for kind, part in segments:
        if kind == "region" and in_force(parse(build([(kind, part)], b"\n"))[0], names):
            part = (part[0], draw(st.lists(plain_line, max_size=4)), part[2])
        out.append((kind, part))
    return out


@settings(max_examples=300, deadline=None)
@given(lab_file(), selection, ending, st.booleans(), st.data())
def test_edits_inside_regions_in_force_are_ok_and_kept(segments, names, eol, last_eol, data):
    old = build(segments, eol, last_eol)
    new = build(rebody(segments, names, data.draw), eol, last_eol)
    assert check(old, new, names) == Checked(new, True, "")


@settings(max_examples=300, deadline=None)
@given(lab_file(), selection, ending, plain_line, st.data())
def test_edits_outside_are_reverted_and_edits_inside_kept(segments, names, eol, extra, data):
    old = build(segments, eol)
    inside = rebody(segments, names, data.draw)
    texts = [i for i, (kind, _) in enumerate(inside) if kind == "text"]
    at = data.draw(st.sampled_from(texts))
    outside = inside[:at] + [("text", inside[at][1] + [extra])] + inside[at + 1:]
    result = check(old, build(outside, eol), names)
    assert not result.ok and "changed outside the editable regions" in result.found
    assert result.data == (build(inside, eol) if any(in_force(r, names) for r in parse(old)) else old)


@settings(max_examples=300, deadline=None)
@given(lab_file(), selection, ending, st.data())
def test_what_check_keeps_checks_clean(segments, names, eol, data):
    old = build(segments, eol)
    lines = old.split(b"\n")[:-1]
    start = build(rebody(segments, names, data.draw), eol).split(b"\n")[:-1]
    new_lines = data.draw(st.sampled_from([start, start, lines]))
    any_line = st.one_of(plain_line, marker("begin", ("a",)), marker("end", ()), st.just(b"# rloop: end edit"))
    for _ in range(data.draw(st.integers(0, 3))):
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        at = data.draw(st.integers(0, len(new_lines)))
        if op == "insert":
            new_lines = new_lines[:at] + [data.draw(any_line)] + new_lines[at:]
        elif new_lines and at < len(new_lines):
            new_lines = new_lines[:at] + ([data.draw(any_line)] if op == "replace" else []) + new_lines[at + 1:]
    new = b"".join(line + b"\n" for line in new_lines)
    if data.draw(st.integers(0, 9)) == 0:
        new = data.draw(st.binary(max_size=40))
    result = check(old, new, names)
    assert result.ok == (result.data == new)
    assert "\n" not in result.found and (result.found == "") == result.ok
    again = check(old, result.data, names)
    assert again == Checked(result.data, True, "")

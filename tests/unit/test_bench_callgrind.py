"""bench.callgrind reads a callgrind dump: self costs per function and object, not counting what a call costs."""

from __future__ import annotations

from bench.callgrind import parse_dump

# The shape callgrind writes: compressed names defined once and referred to by id, relative positions, a call
# whose inclusive cost (the line after `calls=`) belongs to the callee, and a recursion suffix (f'2).
DUMP = """\
# callgrind format
version: 1
positions: line
events: Ir
summary: 1000

ob=(1) /usr/lib/libpython3.11.so
fl=(1) ceval.c
fn=(1) _PyEval_EvalFrameDefault
10 300
+2 100
cob=(2) /usr/lib/libc.so.6
cfl=(2) ???
cfn=(2) memcpy
calls=4 0
* 250
fn=(3) _PyEval_EvalFrameDefault'2
-1 50

ob=(2)
fl=(2)
fn=(2)
0 250
fn=(4) (below main)
0 300

totals: 1000
"""


def test_self_costs_exclude_calls_merge_recursion_and_sum_per_object(tmp_path):
    path = tmp_path / "callgrind.out.1.1"
    path.write_text(DUMP)
    profile = parse_dump(path)
    assert profile.total == 1000
    assert profile.self_cost == {("/usr/lib/libpython3.11.so", "_PyEval_EvalFrameDefault"): 450,
                                 ("/usr/lib/libc.so.6", "memcpy"): 250,
                                 ("/usr/lib/libc.so.6", "(below main)"): 300}
    assert profile.by_object() == {"libpython3.11.so": 450, "libc.so.6": 550}
    assert profile.top(2) == [("_PyEval_EvalFrameDefault", "libpython3.11.so", 450),
                              ("(below main)", "libc.so.6", 300)]

"""Canonical plain form of a test result, and the type-strict comparison of two such forms.

The sandboxed child encodes each result with `encode`; the grader decodes JSON (never unpickles) and compares with
`same` against the expected value it encoded itself from trusted data. The encoding is a JSON value in which a
JSON object is always a type tag, so a forged line can only ever state a plain value:

    None, bool, int, float, str     as themselves (JSON keeps bool/int/float apart: 1, 1.0, true)
    list                            [..]
    tuple / set / frozenset         {"tuple": [..]} / {"set": [..]} / {"frozenset": [..]}
    dict                            {"dict": [[key, value], ..]}
    ListNode (by class name)        {"ListNode": [val, ..]}            the .next chain
    TreeNode (by class name)        {"TreeNode": [val, null, ..]}      LeetCode level order, trailing nulls cut
    anything else                   {"unsupported": "<type name>"}      never equal to anything

Only exact built-in types encode as values: an int/list/str subclass, an always-equal object or a proxy is
"unsupported". ListNode/TreeNode are recognised by class name so that a solution that re-declares the helper
class (common in model output) is judged by structure. Module imports only `math`, because the sandbox child
loads it before any candidate code runs.
"""

from __future__ import annotations

import math

FLOAT_ABS_TOL = 1e-5  # LeetCode's stated tolerance for floating answers
FLOAT_REL_TOL = 1e-6
MAX_NODES = 1_000_000  # longer node chains (or cycles) encode as unsupported

_NONE, _BOOL, _INT, _FLOAT, _STR = type(None), bool, int, float, str
_LIST, _TUPLE, _DICT, _SET, _FROZENSET = list, tuple, dict, set, frozenset
_type, _len, _getattr, _sorted, _repr = type, len, getattr, sorted, repr


def encode(value):
    """Plain JSON-able canonical form of `value` (see module docstring)."""
    t = _type(value)
    if t is _NONE or t is _BOOL or t is _INT or t is _FLOAT or t is _STR:
        return value
    if t is _LIST:
        return [encode(v) for v in value]
    if t is _TUPLE:
        return {"tuple": [encode(v) for v in value]}
    if t is _SET or t is _FROZENSET:
        return {("set" if t is _SET else "frozenset"): _sorted((encode(v) for v in value), key=_repr)}
    if t is _DICT:
        return {"dict": _sorted(([encode(k), encode(v)] for k, v in value.items()), key=_repr)}
    name = _getattr(t, "__name__", "")
    if _type(name) is _STR and name == "ListNode":
        return {"ListNode": _encode_list_node(value)}
    if _type(name) is _STR and name == "TreeNode":
        return {"TreeNode": _encode_tree_node(value)}
    return {"unsupported": _repr(name)[:100]}


def _encode_list_node(head) -> list:
    values = []
    while head is not None:
        if _len(values) >= MAX_NODES:
            raise ValueError("ListNode chain longer than MAX_NODES (or cyclic)")
        values.append(encode(head.val))
        head = head.next
    return values


def _encode_tree_node(root) -> list:
    values, level, seen = [], [root], 0
    while level:
        nxt = []
        for node in level:
            if node is None:
                values.append(None)
                continue
            seen += 1
            if seen > MAX_NODES:
                raise ValueError("TreeNode larger than MAX_NODES (or cyclic)")
            values.append(encode(node.val))
            nxt.extend((node.left, node.right))
        level = nxt
    while values and values[-1] is None:
        values.pop()
    return values


def comparable(form) -> bool:
    """True when a canonical form holds no "unsupported" tag (every expected value must be comparable)."""
    if type(form) is list:
        return all(comparable(v) for v in form)
    if type(form) is dict:
        return "unsupported" not in form and all(comparable(v) for v in form.values())
    return True


def same(expected, got) -> bool:
    """Type-strict deep equality of canonical forms. `expected` is trusted; `got` is decoded untrusted JSON.

    Floats: where `expected` is a float, `got` may be a float or an exact int, equal within FLOAT_ABS_TOL /
    FLOAT_REL_TOL (NaN never equal). Everything else: same JSON type, recursively; set/dict forms are compared
    as sorted collections, elements exactly.
    """
    te, tg = type(expected), type(got)
    if te is float:
        return (tg is float or tg is int) and math.isclose(got, expected, rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL)
    if te is not tg:
        return False
    if te is list:
        return len(expected) == len(got) and all(same(e, g) for e, g in zip(expected, got))
    if te is dict:
        if expected.keys() != got.keys() or len(expected) != 1:
            return False
        (tag, body_e), body_g = next(iter(expected.items())), next(iter(got.values()))
        if tag == "unsupported" or type(body_g) is not list:
            return False
        if tag in ("set", "frozenset"):  # membership is exact: no tolerance inside hashed collections
            return sorted(map(repr, body_e)) == sorted(map(repr, body_g))
        if tag == "dict":  # keys exact, values by `same`; re-sorted here, the child's order is not trusted
            if not all(type(pair) is list and len(pair) == 2 for pair in body_g):
                return False
            pairs_e = sorted(body_e, key=lambda pair: repr(pair[0]))
            pairs_g = sorted(body_g, key=lambda pair: repr(pair[0]))
            return len(pairs_e) == len(pairs_g) and all(
                repr(ke) == repr(kg) and same(ve, vg) for (ke, ve), (kg, vg) in zip(pairs_e, pairs_g))
        return same(body_e, body_g)
    return expected == got  # None, bool, int, str of identical exact type

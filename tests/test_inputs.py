"""The two lowest layers (issue 22): `retrofit.inputs` reads the user's files within bounds, and
`retrofit.errors.excerpt` is what every message quotes of a value it rejects. The bounds are checked at
their edges (the largest input taken, one more refused), and every error message of the package is
checked to quote through the excerpt."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from retrofit.errors import RetrofitError, excerpt, first_line
from retrofit.inputs import MAX_DEPTH, MAX_NODES, load_json, load_yaml, read_text, regular_file
from support import billion_laughs, special_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "value, shown",
    [
        ("layer3.*", "'layer3.*'"),
        (Path("a\nb.yaml"), "a\\nb.yaml"),
        ("\x1b[31mred", "'\\x1b[31mred'"),
        ([1] * 2_000_000, "[1, 1, 1, 1, 1, 1, ...]"),
        ({"r": 8}, "{'r': 8}"),
        (3.5, "3.5"),
        (None, "None"),
        (10**100_000, "<a whole number of about 100,000 digits>"),
        (b"abc", "'abc'"),
    ],
    ids=range(9),
)
def test_an_excerpt_is_short_escaped_and_one_line(value, shown):
    assert excerpt(value) == shown


def test_an_excerpt_keeps_both_ends_of_a_long_text():
    text = excerpt("a" * 1000 + "b" * 1000)
    assert text == "'" + "a" * 30 + "..." + "b" * 27 + "'" and len(text) == 62
    path = excerpt(Path("/" + "d/" * 500 + "model.safetensors"))
    assert len(path) == 120 and path.startswith("/d/d/") and path.endswith("/d/model.safetensors")
    assert excerpt("x" * 60) == "'" + "x" * 60 + "'"  # at the limit: whole


def test_an_excerpt_of_a_value_nested_deeper_than_python_recurses_is_bounded():
    deep = current = []
    for _ in range(100_000):
        current.append([])
        current = current[0]
    assert excerpt(deep) == "[[[[...]]]]"
    assert excerpt({"k" * 10_000: list(range(10**6))}).startswith("{'kkk") and len(excerpt({"k" * 10_000: 1})) <= 60


def test_first_line_is_escaped_and_cut():
    assert first_line(ValueError("bad \x1b[2J value\nsecond line")) == "bad \\x1b[2J value"
    assert len(first_line(ValueError("x" * 10_000))) == 300


def test_json_is_read_to_the_depth_bound_brackets_in_strings_not_counted():
    deepest = load_json("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    for _ in range(MAX_DEPTH - 1):
        deepest = deepest[0]
    assert deepest == []
    assert load_json('{"a": "' + "[" * 40 + '"}') == {"a": "[" * 40}
    assert load_json('["\\"' + "{" * 40 + '"]') == ['"' + "{" * 40]


@pytest.mark.parametrize(
    "text, words",
    [
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nested more than 32 levels deep"),
        ("[" * 100_000 + "]" * 100_000, "nested more than 32 levels deep"),
        ("[1", "not valid JSON (Expecting ',' delimiter: line 1 column 3 (char 2))"),
        ("9" * 5000, "not valid JSON (Exceeds the limit (4300 digits)"),
    ],
    ids=["33-levels", "100000-levels", "broken", "long-number"],
)
def test_json_over_the_bound_or_broken_is_one_short_value_error(text, words):
    with pytest.raises(ValueError) as caught:
        load_json(text)
    assert str(caught.value).startswith(words) and len(str(caught.value)) <= 120


def test_yaml_at_and_over_its_bounds():
    assert load_yaml("a: " + "[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1)) is not None  # a scalar is no level
    with pytest.raises(ValueError, match="is nested more than 32 levels deep at line 1"):
        load_yaml("a: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH)
    assert len(load_yaml("[" + ",".join(["1"] * (MAX_NODES - 1)) + "]")) == MAX_NODES - 1
    with pytest.raises(ValueError, match="holds more than 100,000 values at line 1"):
        load_yaml("[" + ",".join(["1"] * MAX_NODES) + "]")
    assert load_yaml("a: &x [1, 2]\nb: 3") == {"a": [1, 2], "b": 3}  # an anchor alone is harmless
    for text in (billion_laughs("r", 9), "a: &x 1\nb: *x", "base: &b {r: 8}\nother:\n  <<: *b\n"):
        with pytest.raises(ValueError, match=r"uses an alias \(\*\w+\) at line \d; aliases are not allowed"):
            load_yaml(text)
    with pytest.raises(ValueError, match="^not valid YAML at line 3$"):  # where the stream ended
        load_yaml("a: 1\nb: [\n")
    with pytest.raises(ValueError, match="^not valid YAML"):
        load_yaml("!!python/object/apply:os.system ['true']")  # the safe loader: no Python objects


def test_a_billion_laughs_costs_nothing_under_a_memory_cap():
    """Nine levels of aliases (10^9 strings once expanded): refused in a child process limited to 1 GiB."""
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); import sys\n"
        "from retrofit.inputs import load_yaml\n"
        "try: load_yaml(sys.argv[1])\nexcept ValueError as err: print(err)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, billion_laughs("only", 9)], capture_output=True, text=True, timeout=60
    )
    said = "uses an alias (*a0) at line 1; aliases are not allowed, write the value out"
    assert run.stdout.strip() == said, run.stderr


@pytest.mark.parametrize("kind", ["zero", "urandom", "fifo", "dir", "loop"])
def test_a_special_file_is_named_never_opened_for_long(tmp_path, kind):
    path, what = special_files(tmp_path, ".txt")[kind]
    for call in (lambda: read_text(path, "notes"), lambda: regular_file(path, "notes")):
        with pytest.raises(RetrofitError) as caught:
            call()
        assert str(caught.value).startswith(f"notes {path} {what}")


def test_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(RetrofitError, match=f"^notes {tmp_path}/nope not found$"):
        read_text(tmp_path / "nope", "notes")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RetrofitError, match="below not found$"):
        read_text(tmp_path / "file" / "below", "notes")
    with pytest.raises(RetrofitError, match=r"cannot be opened \(File name too long\)"):
        read_text(tmp_path / ("x" * 5000), "notes")
    (tmp_path / "bytes").write_bytes(b"ok \xff\xfe")
    with pytest.raises(RetrofitError, match=r"is not UTF-8 text \(byte 3\)"):
        read_text(tmp_path / "bytes", "notes")
    (tmp_path / "big").write_text("x" * 11)
    assert read_text(tmp_path / "big", "notes", limit=11) == "x" * 11
    with pytest.raises(RetrofitError, match="big is larger than 10 bytes"):
        read_text(tmp_path / "big", "notes", limit=10)


# -- every error message quotes what it rejects through the excerpt -------------------------------------
ALLOWED = {
    ("retrofit/__init__.py", "name"),  # the module's __getattr__: Python's own AttributeError wording
    ("retrofit/graph/forward.py", "target"),
}  # a callable of the model's own code


def message_calls(tree: ast.AST):
    """Every raise of an exception and every warning whose message is an f-string."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name.endswith(("Error", "Warning")) or name in ("warn", "bad"):
                yield from (j for a in node.args for j in ast.walk(a) if isinstance(j, ast.JoinedStr))


def test_no_message_quotes_a_value_by_its_whole_repr():
    """`{value!r}` in a message repeats a value of any size (a 6 MB line for a 2-million-element r):
    every message quotes ``excerpt(value)`` instead."""
    found = []
    for path in sorted((ROOT / "retrofit").rglob("*.py")):
        where = str(path.relative_to(ROOT))
        for joined in message_calls(ast.parse(path.read_text())):
            for part in joined.values:
                if (
                    isinstance(part, ast.FormattedValue)
                    and part.conversion == ord("r")
                    and (where, ast.unparse(part.value)) not in ALLOWED
                ):
                    found.append(f"{where}: {ast.unparse(part.value)}!r")
    assert found == []


def test_the_rule_sees_a_whole_repr(tmp_path):
    tree = ast.parse('def f(value):\n    raise ValueError(f"bad {value!r}")\n')
    assert [
        ast.unparse(p.value)
        for j in message_calls(tree)
        for p in j.values
        if isinstance(p, ast.FormattedValue) and p.conversion == ord("r")
    ] == ["value"]

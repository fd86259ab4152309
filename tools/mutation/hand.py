"""Issue 22's hand mutants (docs/contributing/mutation.md): apply one (a text replacement) to a checkout, run a pytest
selection, put the file back. Run by hand, under the machine-wide lock, never in the suite or CI:

    PYTHONPATH=TREE flock /tmp/cpu.lock .venv/bin/python tools/mutation/hand.py TREE new M1 M2a ...
    PYTHONPATH=OLD flock /tmp/cpu.lock .venv/bin/python tools/mutation/hand.py OLD old M1 M2 ...

TREE: a checkout of this branch (the tests that kill each mutant are run); OLD: a checkout of a1def68
(its own tests of the module are run: the mutant survived them). C1...C14 are the mutation tool's survivors that
new tests kill, for TREE only. Prints 'ID FILE killed|survived'."""

import subprocess
import sys
from pathlib import Path

from pytest_command import PYTEST  # tools/mutation/, this script's folder

MUTANTS = {
    # id: (file, {tree: (old text, new text)}, test selection on a1def68 (survival), killing tests (new tree))
    "M1": (
        "retrofit/measure/overhead.py",
        {
            "*": (
                "return sum(p.numel() for p in model.parameters())",
                "return sum(p.numel() for p in model.parameters() if p.requires_grad)",
            )
        },
    ),
    "M2": (
        "retrofit/measure/overhead.py",
        {"old": ("shape_in == shape_out and len(shape_in) == 4", "shape_in == shape_out and len(shape_in) >= 3")},
    ),
    "M2a": (
        "retrofit/measure/overhead.py",
        {"new": ("n * (length - prefix) * c if gating", "n * length * c if gating")},
    ),
    "M2b": (
        "retrofit/measure/overhead.py",
        {"new": ('(sides[2], sides[0], sides[1]) if layout == "nhwc" else sides', "sides")},
    ),
    "M2c": ("retrofit/measure/overhead.py", {"new": ('if layout == "tokens" and len(shape_in) == 3:', 'if False:')}),
    "M3": (
        "retrofit/measure/overhead.py",
        {
            "*": (
                "stage = max(0, round(math.log2(height / h))) if h else 0",
                "stage = max(0, round(math.log2(height / h)) + 1) if h else 0",
            )
        },
    ),
    "M4": ("retrofit/files/header.py", {"*": ('r"[0-9a-f]{64}"', 'r"[0-9a-f]{1,64}"')}),
    "M5": ("retrofit/files/header.py", {"*": ('arch) or not timm.is_model(arch):', 'arch):')}),
    "M6": ("retrofit/files/header.py", {"*": ('len(meta["base_name"]) > 200', 'len(meta["base_name"]) > 2000')}),
    "M7": ("retrofit/files/header.py", {"*": ('if meta.get("weights", WEIGHTS[0]) not in WEIGHTS:', 'if False:')}),
    "M8": ("retrofit/files/bounds.py", {"*": ("low <= value <= high", "low <= value < high")}),
    "M9": ("retrofit/surgery/recipe_fields.py", {"*": ("elif stage in entries:", "elif False:")}),
    "M10": ("retrofit/surgery/recipe_fields.py", {"*": ("if n is None or n < 1:", "if n is None or n < 0:")}),
    "M11": ("retrofit/surgery/recipe_fields.py", {"*": ("if stages is None and only is None:", "if False:")}),
    "M12": ("retrofit/surgery/plan.py", {"*": ("    if not insertions:\n", "    if False:\n")}),
    "M13": ("retrofit/surgery/plan.py", {"*": ("for call in calls[1:]:", "for call in []:")}),
    "M14": (
        "retrofit/surgery/insert.py",
        {
            "old": (
                """        for name in buffers + blocks:
            delattr(module, name)
        for name in was_none:  # timm's `self.se = None`: its forward still reads it
            setattr(module, name, None)
        raise""",
                "        raise",
            ),
            "new": (
                """    except BaseException:
        rollback()
        raise""",
                """    except BaseException:
        raise""",
            ),
        },
    ),
    "M14b": (
        "retrofit/surgery/insert.py",
        {
            "new": (
                """        for rollback in reversed(undo):
            rollback()""",
                """        pass""",
            )
        },
    ),
    "M15": (
        "retrofit/surgery/insert.py",
        {"old": ("info.weights = previous.weights", "pass"), "new": ("weights=previous.weights,", "")},
    ),
    "M16": (
        "retrofit/surgery/insert.py",
        {"*": ("tensor.clone(), persistent=False)", "tensor.clone(), persistent=True)")},
    ),
    "M17": (
        "retrofit/surgery/insert.py",
        {
            "*": (
                'if info.channels / info.config.r < 1 and info.config.reads("r"):',
                "if info.channels / info.config.r < 1:",
            )
        },
    ),
}
# the mutation tool's survivors (cosmic-ray, sessions at 1a69446; docs/contributing/mutation.md) that new tests
# kill, as text edits of this tree: id: (file, {"new": (old text, new text)}, the tests that kill it)
SURVIVORS = {
    "C1": ("retrofit/measure/overhead.py", ("n) / self.base_params", "n) | self.base_params"), "percentages"),
    "C1b": ("retrofit/measure/overhead.py", ("n) / self.base_params", "n) ** self.base_params"), "percentages"),
    "C1c": ("retrofit/measure/overhead.py", ("n) / self.base_params", "n) << self.base_params"), "percentages"),
    "C2b": ("retrofit/measure/overhead.py", ("n) / self.base_macs", "n) & self.base_macs"), "percentages"),
    "C2": ("retrofit/measure/overhead.py", ("100.0 * (self.added_macs", "100.0 // (self.added_macs"), "percentages"),
    "C3": (
        "retrofit/measure/overhead.py",
        ("if shape_in is None:\n        return 0, (0, 0)", "if shape_in is None:\n        return 1, (0, 0)"),
        "no_geometry",
    ),
    "C4": (
        "retrofit/measure/overhead.py",
        ("    return 0, (0, 0), 0, 0\n\n\n", "    return 1, (0, 0), 0, 0\n\n\n"),
        "no_geometry",
    ),
    "C5": (
        "retrofit/measure/overhead.py",
        # line 257's count of a block's passes is now _geometry's, called on the shape the block would take
        ("_geometry(shape, shape, b.layout", "_geometry(shape, None, b.layout"),
        "plan",
    ),
    "C6": ("retrofit/measure/overhead.py", ("base.params + sum(c.params", "base.params / sum(c.params"), "plan"),
    "C7": ("retrofit/measure/overhead.py", ("(1, prefix + size[0]", "(2, prefix + size[0]"), "plan"),
    "C8": ("retrofit/measure/overhead.py", ("(1, prefix + size[0]", "(1, prefix / size[0]"), "plan"),
    "C9": ("retrofit/surgery/prepare.py", ('"nhwc": shape[1:3]', '"nhwc": shape[1:2]'), "channels_last_maps_record"),
    "C10": (
        "retrofit/surgery/prepare.py",
        ("if any(r is None or twin not in", "if not any(r is None or twin not in"),
        "read_twice",
    ),
    "C11": ("retrofit/surgery/recipe.py", ("if k != NAMED]", "if k is not NAMED]"), "kind_module"),
    "C12": ("retrofit/surgery/sites.py", ("shape != N.shape(b)", "shape > N.shape(b)"), "read_twice"),
    "C13": ("retrofit/files/header.py", ("if len(size) != 3 or", "if len(size) < 3 or"), "four_numbers"),
    "C14": ("retrofit/files/header.py", ("input_size[0] != 3:", "input_size[-1] != 3:"), "constructor_arguments"),
}
SURVIVOR_TESTS = {  # -k selection -> the test files it is in
    "percentages": ["tests/measure/test_overhead.py"],
    "no_geometry": ["tests/measure/test_overhead.py"],
    "plan": ["tests/sweep/test_sweep.py"],
    "channels_last_maps_record": ["tests/surgery/test_add_se.py"],
    "read_twice": ["tests/surgery/test_add_se.py"],
    "kind_module": ["tests/surgery/test_recipe.py"],
    "four_numbers": ["tests/files/test_trust.py"],
    "constructor_arguments": ["tests/files/test_trust.py"],
}

OLD_TESTS = {  # a1def68's own tests of each module, the files the killing tests went into (the survival check)
    "overhead.py": ["tests/measure/test_overhead.py", "tests/measure/test_closed_form.py"],
    "header.py": ["tests/files/test_trust.py"],
    "bounds.py": ["tests/files/test_trust.py"],
    "recipe_fields.py": ["tests/surgery/test_recipe.py", "tests/surgery/test_per_stage.py"],
    "plan.py": ["tests/surgery/test_add_se.py", "tests/surgery/test_surgery.py"],
    "insert.py": ["tests/surgery/test_add_se.py", "tests/surgery/test_surgery.py"],
}
NEW_TESTS = {  # the tests written to kill them
    "overhead.py": ["tests/measure/test_overhead.py"],
    "header.py": ["tests/files/test_trust.py"],
    "bounds.py": ["tests/files/test_trust.py"],
    "recipe_fields.py": ["tests/surgery/test_recipe.py"],
    "plan.py": ["tests/surgery/test_insert.py"],
    "insert.py": ["tests/surgery/test_insert.py"],
}


def main():
    tree, which, ids = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    for mid in ids:
        if mid in SURVIVORS:  # the new tree only: the tests of its -k selection
            path, edit, selection = SURVIVORS[mid]
            tests = [*SURVIVOR_TESTS[selection], "-k", selection]
        else:
            path, edits = MUTANTS[mid]
            edit = edits.get(which) or edits.get("*")
            tests = (OLD_TESTS if which == "old" else NEW_TESTS)[Path(path).name]
        if edit is None:
            print(mid, "not applicable to", which)
            continue
        f = tree / path
        src = f.read_text()
        assert src.count(edit[0]) == 1, (mid, src.count(edit[0]))
        f.write_text(src.replace(edit[0], edit[1]))
        try:
            run = subprocess.run([*PYTEST, "-x", *tests], cwd=tree, capture_output=True, text=True, timeout=1800)
            last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-200:]
            failed = [line for line in run.stdout.splitlines() if line.startswith("FAILED")]
            print(mid, path, "killed" if run.returncode else "survived", "|", last, "|", failed[:1], flush=True)
        finally:
            f.write_text(src)


main()

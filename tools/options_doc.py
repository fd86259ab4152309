"""docs/reference/options.md: every option of a fine-tune and every field of a recipe, made from their one definition
(retrofit.FinetuneConfig's fields, retrofit.Recipe's fields). `python tools/options_doc.py` writes it;
tests/test_docs.py fails when it is not up to date."""

from __future__ import annotations

import sys
from pathlib import Path

from retrofit.surgery.recipe import reference_table, reference_yaml
from retrofit.train.config import markdown_table

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference" / "options.md"


def page() -> str:
    return f"""# Options

Made by `python tools/options_doc.py` from the one definition of each option (a test fails when this page
is not up to date): the fields of `retrofit.FinetuneConfig` (`retrofit/train/config.py`) and of
`retrofit.Recipe` (`retrofit/surgery/recipe.py`; the help of its fields in `retrofit/blocks/help.py` and
`retrofit/surgery/help.py`). The same text is in `--help`, in the docstrings and in the typer options.

## Fine-tune options

`retrofit.finetune(model, data, config=None, **options)` takes each as a keyword argument (or in a
`retrofit.FinetuneConfig`); `retrofit finetune`, `add-se --finetune` and (the options of one run)
`sweep --data` and `tune` take each as the flag given. A bound is checked in Python and on the command
line alike.

{markdown_table()}

## Recipe fields

A recipe is a YAML file, a `retrofit.Recipe` or keyword arguments of `retrofit.add_se` with these fields;
`retrofit add-se` takes each as `--field-name` (`--r`, `--min-width`...; `overrides` only in a file). A
block field (`r`, `squeeze`, `gate`, `divisor`, `min_width`, `bias`, `init`, `module`, `allow_wide`) may
also be a per-stage map (`r: {{2: 8, 5: 32}}`, on the command line `--r 2:8,5:32`).

{reference_table()}

Every field at its default, as a YAML file:

```yaml
{reference_yaml()}
```
"""


def main() -> int:
    PAGE.write_text(page())
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tables fitted to the console: optional columns go in their order and the caption says which, headline
columns stay whole, an empty column is left out, and a console too narrow gets one line per value."""

import re

from rich.console import Console

from retrofit.measure.fit import Col, FitTable


def render(table, width):
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    console.print(table)
    return console.export_text()


def sample():
    t = FitTable(
        [
            Col("model", "left"),
            Col("params added"),
            Col("stride", drop=1),
            Col("pool+scale ops", drop=0),
            Col("empty", drop=2),
            Col("note", "left", drop=3, text=True),
        ],
        title="T",
        caption="Counts.",
    )
    t.add_row("layer3.22.se_post", "4,777,712", "16", "17,862,656", "", "a note of some words that go on and on")
    t.add_row("layer4.0.se_post", "49,326,872", "32", "602,112", "", "")
    return t


def lines_of(text):
    return [ln for ln in text.splitlines() if ln[:1] in "┏┃┡│├└"]


def test_wide_enough_every_filled_column_shows_and_headers_stay_on_one_line():
    text = render(sample(), 160)
    header = lines_of(text)[1]
    assert [h.strip() for h in header.strip("┃").split("┃")] == [
        "model",
        "params added",
        "stride",
        "pool+scale ops",
        "note",
    ]  # "empty" has no cell: left out
    assert "Not shown" not in text and "a note of some words that go on and on" in text


def test_optional_columns_go_lowest_drop_first_and_the_caption_names_them():
    table = sample()
    # the widths by hand: model 17 (its longest cell), params added 10 (a cell; the header's longest word is
    # 6), stride 6 (the header), pool+scale ops 10 (a cell, and the word "pool+scale"), note 20 (free text: at
    # most 20 for the layout); 3 per column for padding and borders, and one more
    assert table.layout(17 + 10 + 6 + 10 + 20 + 3 * 5 + 1) == [0, 1, 2, 3, 5]
    assert table.layout(17 + 10 + 6 + 10 + 20 + 3 * 5) == [0, 1, 2, 5]  # one short: pool+scale ops (drop 0) goes
    assert table.layout(17 + 10 + 6 + 20 + 3 * 4) == [0, 1, 5]  # then stride (drop 1)
    assert table.layout(17 + 10 + 3 * 2 + 1) == [0, 1]  # then the note (drop 3)
    assert table.layout(17 + 10 + 3 * 2) is None  # the headline columns alone do not fit
    text = render(table, 60)
    assert "Not shown at this width: stride, pool+scale ops (a wider terminal or --json has them)." in " ".join(
        text.split()
    )
    assert "empty" not in text  # an empty column is not news


def test_no_number_or_name_is_ever_cut_or_folded():
    for width in range(34, 130):
        text = render(sample(), width)
        assert all(len(ln) <= width for ln in text.splitlines()), width
        for token in ("layer3.22.se_post", "layer4.0.se_post", "4,777,712", "49,326,872"):
            assert re.search(rf"(?<![\w.,]){re.escape(token)}(?![\w.,])", text), (width, token)
        assert "…" not in text


def test_too_narrow_for_the_headline_columns_one_line_per_value():
    text = render(sample(), 30)
    assert "┃" not in text and "│" not in text  # no table
    blocks = [[ln.rstrip() for ln in b.splitlines()] for b in text.split("\n\n")]
    assert blocks[0] == [
        "T",
        "model: layer3.22.se_post",
        "params added: 4,777,712",
        "stride: 16",
        "pool+scale ops: 17,862,656",
        "note: a note of some words",
        "that go on and on",
    ]
    assert blocks[1] == [
        "model: layer4.0.se_post",
        "params added: 49,326,872",
        "stride: 32",
        "pool+scale ops: 602,112",
        "Counts.",
    ]


def test_a_free_text_column_folds_into_the_width_left():
    text = render(sample(), 17 + 10 + 6 + 10 + 20 + 3 * 5 + 1)
    assert all(len(ln) <= 79 for ln in text.splitlines())
    assert "a note of some words" in text and "on and on" in text and "…" not in text


def test_full_has_every_column_for_a_card():
    full = sample().full()
    assert [c.header for c in full.columns] == ["model", "params added", "stride", "pool+scale ops", "empty", "note"]
    assert list(full.columns[1].cells) == ["4,777,712", "49,326,872"]

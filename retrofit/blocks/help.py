"""The block fields' help and bounds, without torch: the one text each field's docs, ``add-se --help``
(which loads no torch), the YAML reference and the docstrings show (:class:`retrofit.blocks.config.BlockConfig`
puts each in its field's metadata)."""

# Bounds that keep a recipe from asking for absurd blocks (a file's metadata can say `r: 1e-4`, which
# would allocate 2 x 10^4 C^2 weights per block): r below 1 makes a block wider than its input and
# needs allow_wide; even then a block is at most MAX_EXPANSION times wider than its input. divisor
# and min_width round the width up: at most MAX_ROUNDING each.
MAX_EXPANSION = 16
MAX_ROUNDING = 1024

# field -> (help, an example of its per-stage form on the command line)
BLOCK_HELP: dict[str, tuple[str, str]] = {
    "r": (
        f"Reduction ratio: a block on C channels squeezes them to about C / r (r >= 1; below 1 needs allow_wide, "
        f"and r >= 1/{MAX_EXPANSION} even then).",
        "2:8,3:8,4:16,5:32",
    ),
    "squeeze": ("Global pooling of the squeeze step: avg (the paper's) or max.", "5:max"),
    "gate": ("The excitation's last activation: sigmoid, hard_sigmoid, tanh or relu.", "5:tanh"),
    "divisor": (
        f"The reduced width is rounded to a multiple of this (timm's make_divisible; timm uses 8); at most "
        f"{MAX_ROUNDING}.",
        "4:8,5:8",
    ),
    "min_width": (
        f"Smallest reduced width (timm uses the divisor); a width under 1 is raised to it, with a warning; "
        f"at most {MAX_ROUNDING}.",
        "5:8",
    ),
    "bias": (
        "Biases on the block's two 1x1 convolutions (timm and the released models have them; the paper's "
        "parameter count does not).",
        "5:false",
    ),
    "init": (
        "preserve: every block starts as an exact identity, so the model computes what it did before; paper: "
        "PyTorch's default random init (timm's SE models).",
        "5:paper",
    ),
    "module": (
        "The block: se, or one of timm's attention modules ese, eca, ceca, cbam, gc (each reads only some of "
        "the block fields).",
        "2:eca,3:eca",
    ),
    "allow_wide": (f"Allow r below 1 (blocks wider than their input); even then r >= 1/{MAX_EXPANSION}.", "5:true"),
}

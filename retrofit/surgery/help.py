"""The help of the recipe's own fields (those that are not block fields: :mod:`retrofit.blocks.help`),
without torch: ``add-se --help`` reads them. :class:`retrofit.surgery.recipe.Recipe` puts each in its field's
metadata; the docstring, the docs' table and YAML reference are made from there."""

# field -> (help, an example of its value on the command line)
RECIPE_HELP: dict[str, tuple[str, str]] = {
    "position": (
        "Where each block goes: standard (on the residual branch, before the sum), pre (on the unit's input, "
        "feeding the branch), post (after the sum and the unit's activation), identity (on the shortcut), "
        "inside (after the branch's 3x3 convolution).",
        "",
    ),
    "stages": (
        "Stages that get blocks, e.g. [3, 4] (stage = log2 of the output stride: 2 to 5 on a ResNet); all: "
        "every stage.",
        "3,4",
    ),
    "kinds": (
        "Site kinds that get blocks: residual, inception, conv3x3 (or inside), pyramid (an FPN's top-down sums: "
        "not residual units, off by default), module (the at sites); default: every kind the position applies "
        "to but pyramid (with at: the at sites only).",
        "residual,inception",
    ),
    "only": (
        "Module-path globs (fnmatch, e.g. layer3.*) of the sites that get blocks; a parent path selects every "
        "site inside it.",
        "'layer3.*'",
    ),
    "skip": (
        "Module-path globs of sites that get no block; a glob that matches no site is an error.",
        "'layer1.*,layer2.0'",
    ),
    "overrides": (
        "Ordered entries, each selecting sites by stages and/or only and setting block fields there, e.g. "
        "[{stages: [4, 5], r: 32}, {only: [layer4.2], module: eca}]; a later entry wins.",
        "",
    ),
    "at": (
        "A block on the output of each module these globs name (* within one name, ** across names), as sites of "
        "kind module.",
        "'features.denseblock*,features.transition*'",
    ),
}

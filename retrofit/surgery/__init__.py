"""Where the blocks go and how: the recipe, the sites, the plan, the insertion, and its undoing.

* :mod:`.recipe`: :class:`~retrofit.surgery.recipe.Recipe` (YAML, keyword arguments, CLI options);
* :mod:`.recipe_fields`: one validator per field, per-stage maps and overrides;
* :mod:`.per_site`: a recipe resolved at one site (the block it builds there);
* :mod:`.sites`: residual merges, Inception merges and 3x3 convolutions found in the analysis graph;
* :mod:`.positions`: where a block goes at a site (``standard``, ``pre``, ``post``, ``identity``, ``inside``);
* :mod:`.named`: ``at:`` sites, the outputs of modules the user names;
* :mod:`.plan`: a recipe planned on a scan (sites selected and placed, typos refused);
* :mod:`.prepare`: every forward a plan touches rebuilt and checked, nothing changed yet;
* :mod:`.insert`: :func:`~retrofit.surgery.insert.add_se`, the blocks built and the forwards installed;
* :mod:`.info`: what a retrofit records on the model (read with ``retrofit.get_info(model)``);
* :mod:`.strip`, :mod:`.bypass`, :mod:`.trainable`: undo it, switch the blocks off, count what trains;
* :mod:`.neighbour`, :mod:`.fold`: the layer that can absorb a constant gate exactly, and the fold itself.

A new position is one function registered in :mod:`.positions`.
"""

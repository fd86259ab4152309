"""What is inserted: the blocks themselves, with no knowledge of models, graphs or recipes.

* :mod:`.se`: :class:`~retrofit.blocks.se.SqueezeExcite` (timm's ``SEModule`` layout, the exact
  function-preserving init), its gates and squeezes;
* :mod:`.se_layout`: the same block on channels-last maps and token sequences;
* :mod:`.attention`: the registry of insertable modules (SE and timm's ``ese``, ``eca``, ``cbam``...);
* :mod:`.config`: :class:`~retrofit.blocks.config.BlockConfig`, one block's fields, checks and width;
* :mod:`.excitation`: a channel gate's excitation: where to read it, when it is a constant, that constant;
* :mod:`.scale`: :class:`~retrofit.blocks.scale.ChannelScale`, what a folded gate becomes without a neighbour.

A new block is one function registered in :mod:`.attention`.
"""

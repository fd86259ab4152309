"""Files: retrofitted models and adapters in safetensors, model cards, the user's weight files.

* :mod:`.checkpoint`: :func:`~retrofit.files.checkpoint.save` and :func:`~retrofit.files.checkpoint.load`;
* :mod:`.header`: a file's metadata and its checks (a file is data, never instructions);
* :mod:`.tensors`: tensor names, dtypes and shapes read from a header and checked against a model;
* :mod:`.meta_check`: the architecture a file names checked against its tensors on the meta device;
* :mod:`.full`: a full model file rebuilt and loaded;
* :mod:`.adapter`: only the blocks and what changed, on a base identified by its hash;
* :mod:`.card`: the model card written beside each file;
* :mod:`.models`: a timm model built by name, with the user's weight file;
* :mod:`.atomic`: every write atomic (temporary folder, then rename), one line when it fails.

A new file format is a module here, called by :mod:`.checkpoint`.
"""

"""The pieces of the fine-tuning stage; :func:`retrofit.finetune` puts them together.

One concept per module, so a new training option is one local change:

* :mod:`.params`: what trains in each phase (the blocks, a new head, everything) and which layers
  stay in eval mode;
* :mod:`.optim`: optimizer and scheduler from timm's factories, and the DDP wrapper;
* :mod:`.loop`: one training epoch (micro-batches, accumulation, DDP ``no_sync``);
* :mod:`.evaluate`: validation loss and top-1/top-5, and :func:`~.evaluate.bypass_se` (the original
  network: the blocks pass their input through);
* :mod:`.run_dir`: the run's folder: the training state (one commit per epoch), ``last``/``best``
  models and ``metrics.jsonl`` rewritten from it on resume, the folder's lock;
* :mod:`.progress`: rich progress bars on stderr (rank 0).
"""

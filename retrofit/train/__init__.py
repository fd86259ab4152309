"""The fine-tune: :func:`retrofit.finetune` (:mod:`.finetune`) makes a :class:`~retrofit.train.run.Run`
(:mod:`.run`) of its :class:`~retrofit.train.config.FinetuneConfig` and runs it.

One concept per module, so a new training option is one local change:

* :mod:`.config`: every option of a fine-tune, each defined once (type, default, bounds, help);
* :mod:`.result`: what it measured;
* :mod:`.data`: the user's ImageFolder, read by timm, every image used each epoch;
* :mod:`.params`: what trains in each phase (the blocks, a head, norm layers, everything), at which
  rate, and which layers stay in eval mode;
* :mod:`.optim`: optimizer and scheduler from timm's factories, and the DDP wrapper;
* :mod:`.loss`: the objective: label smoothing, mixup / cutmix, distillation from the original network;
* :mod:`.loop`: one training epoch (micro-batches, accumulation, DDP ``no_sync``, gradient clipping);
* :mod:`.ema`: the model EMA (timm's ``ModelEmaV3``), evaluated as a row of its own;
* :mod:`.evaluate`: validation loss and top-1/top-5 (the "original" row evaluates the model inside
  :func:`retrofit.bypass`);
* :mod:`.record`: the rows of a run and the best one;
* :mod:`.state`: the training state a resumed run continues from, checked before use;
* :mod:`.run_dir`: the run's folder: the training state (one commit per epoch), ``last``/``best``
  models and ``metrics.jsonl`` rewritten from it on resume, the folder's lock;
* :mod:`.distributed`: ``torchrun``: one process per device, rank 0 writes;
* :mod:`.progress`: rich progress bars on stderr (rank 0);
* :mod:`.inspect`: :func:`retrofit.inspect`, the gates read on the val images (and the evaluations
  :func:`retrofit.fold` shares with it).
"""

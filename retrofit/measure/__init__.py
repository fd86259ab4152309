"""What a retrofit costs and how to show it.

* :mod:`.overhead`: parameters and multiply-adds added, per block, stage and total, to the unit;
* :mod:`.latency`: forward time of models measured side by side;
* :mod:`.meta`: the analysis on a model built on the meta device (no weights, no memory);
* :mod:`.report`: the rich tables and JSON of sites, overhead, latency, fine-tuning, inspect and fold;
* :mod:`.excitation`: what each channel gate's excitation does on data (hooks, statistics);
* :mod:`.excitation_plot`: the paper's figure of it (the optional ``plot`` extra).
"""

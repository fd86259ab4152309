"""torch.fx machinery: a model traced into one flat analysis graph, shapes and multiply-adds on meta
tensors, and one module's forward rebuilt from that graph and installed on the instance.

* :mod:`.trace`: the leaf-aware tracer that records the module call tree;
* :mod:`.opaque`: modules fx cannot trace, kept as they are, their callees traced apart;
* :mod:`.restore`: what tracing changes on a model, put back on every exit path;
* :mod:`.shapes`: shape propagation and multiply-adds on meta tensors (an ``fx.Interpreter``);
* :mod:`.nodes`: what a node does (merge, convolution, pointwise layer...);
* :mod:`.rebuild`: one module's forward rebuilt at its own level from the flat graph;
* :mod:`.two_modes`: forwards that differ in train and eval mode;
* :mod:`.forward`: the rebuilt forward installed on the module instance (scriptable, picklable...);
* :mod:`.model`: what a model says about itself: its name and input size.

Nothing here knows about recipes or SE sites: :mod:`retrofit.surgery` reads and edits these graphs.
"""

"""Runtime: what every stage runs on.

Reads models, calibration items and the process group; produces ``Inputs``
batches (``inputs``), data without downloads (``data``), models built from
names (``models``), several GraphModules of one graph run in lockstep
(``runner``), statistics summed over ``torch.distributed`` ranks
(``distributed``), the memory budget and the C allocator's setting
(``memory``) and the small tensor helpers every pass shares (``tensors``).
It imports no other stage.
"""

"""Merging: permutation groups and two models in, a widened GraphModule out.

Reads ``PermutationGroups`` and the source models' GraphModules; ``matching``
pairs B's features with A's (activation statistics or weights), ``cost`` and
``plan`` choose per group how many pairs merge for the budget, ``widening``
lays out every widened axis and ``rewrite`` emits the widened GraphModule
with its permuted weights (modules from ``layers``); ``zipit`` is ZipIt!'s
matching and partial zipping. The merge's options, state and pass registry
live in ``pipeline``, and the passes of this stage in ``passes``. Imports
only the analysis and the runtime. (The package is ``merging``, not
``merge``: ``fxmerge.merge`` is the public function.)
"""

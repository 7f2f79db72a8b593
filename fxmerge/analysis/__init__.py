"""Analysis: a model in, its permutation groups out.

Reads an ``nn.Module`` and example inputs; ``tracing`` produces a checked
``torch.fx`` GraphModule, ``channels`` runs one rule per op kind (``rules/``)
over the channel-axis IR (``ir``) and ``groups`` collects the IR's free roots
as ``PermutationGroups``. ``permute`` applies one permutation per root to any
tensor, ``verification`` checks that a random permutation of every group
leaves the function unchanged, ``export`` and ``apply`` present and re-apply
the groups without fxmerge. Imports only the runtime.
"""

"""Names and defaults shared by the library and the command line.

This module imports nothing heavy, so the command line can build its parser
(choices, defaults, help) without importing torch.
"""
from __future__ import annotations

VERSION = "0.3.0"

LABELS = ("shared", "disjoint")
MATCHINGS = ("activation", "weight")
# features a LayerNorm normalises: widen them with per-model statistics, or keep them merged
NORM_POLICIES = ("split", "merged")
# inputs least squares fits each layer on: the merged model's own, or the permuted ensemble's
LS_INPUTS = ("merged", "ensemble")
# what least squares fits a layer to when a BatchNorm follows it: the averaged outputs
# (the paper's), or the outputs averaged after each model's normalisation and mapped back
# through the merged model's (only with bn_stats="source", which fixes that normalisation)
LS_TARGETS = ("output", "normalized")
# BatchNorm statistics of the merged model: re-estimated inside the least-squares sweep on
# the merged model's own activations, reset once after fitting, or the sources' own
BN_STATS = ("sweep", "reset", "source")
# what the budget planner counts when it un-merges a pair: its disagreement once, once per
# layer that reads its root, or the residual streams before anything else; "auto": residual
# streams first where a LayerNorm normalises them (transformers), disagreement elsewhere
PLANNER_SCORES = ("auto", "pairs", "reach", "residual")
# storage of the least-squares frontier between sweep steps
FRONTIER_DTYPES = ("float32", "bfloat16", "float16")
# the sweep keeps the values later layers read (a frontier), or re-runs every wave from the input
SCHEDULES = ("frontier", "recompute")
# ZipIt!: heads and convolution groups aligned as units before zipping, or averaged index by index
ZIP_HEADS = ("align", "average")

DEFAULT_METHOD = "pleas"
DEFAULT_RIDGE = 1e-2
DEFAULT_POSITIONS = 64
DEFAULT_NORM_POLICY = "split"
DEFAULT_LS_INPUTS = "merged"
DEFAULT_PLANNER = "auto"  # chosen on the validation split (docs/planner.md)
DEFAULT_LS_TARGETS = "normalized"  # chosen on the validation split (docs/ls-targets.md)
DEFAULT_MEMORY_SHARE = 0.25  # of the memory available when the merge starts
# a budgeted merge warns when its measured cost is off the budget by more than this share of it
COST_TOLERANCE = 0.01
# a merge warns when more than this share of the conv/linear weights cannot be widened
PINNED_SHARE_WARNING = 0.5
# the most models one merge takes (a widened channel's role is a bit set over them)
MAX_MODELS = 8
# rounds of re-aligning every model to the mean of all (``merging.universe``) at most
UNIVERSE_ROUNDS = 5
# the shared order of more than two models: model A's ("reference") or re-aligned to the mean of all ("mean")
UNIVERSES = ("mean", "reference")
DEFAULT_UNIVERSE = "mean"  # chosen on the validation split (docs/n-models.md)

# the demo's architectures: a half-width ResNet-18, a timm ViT, the same ViT written with nn.TransformerEncoder
DEMO_ARCHS = ("resnet", "vit", "torch-vit")

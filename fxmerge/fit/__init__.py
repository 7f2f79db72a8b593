"""Fitting: a widened GraphModule in, its least-squares weights and
BatchNorm statistics out.

Reads the merged model with the source models it was widened from; ``sweep``
walks the graph once over the calibration data (the frontier of values the
later layers still need, spilled beyond the memory cap), ``lstsq`` gathers
each layer's system on the merged model's own inputs and solves it (PLeaS's
ridge, RegMean's closed form), ``batchnorm`` re-estimates or resets the
merged model's BatchNorm statistics; ``passes`` are this stage's passes.
Imports the merging stage (the widened layout), the analysis and the
runtime.
"""

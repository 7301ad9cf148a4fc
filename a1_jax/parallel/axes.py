"""The one vocabulary of logical axis names.

Every parameter is annotated with these at definition (`nn.with_logical_partitioning`); mesh presets in
`configs/mesh/` map them onto the physical mesh axes `data`, `fsdp`, `tensor`, `sequence`. A name not mapped by a
preset stays replicated.
"""

# Parameter axes.
LAYERS = "layers"  # the stacked axis of scanned blocks
EMBED = "embed"  # model width (the residual stream)
MLP = "mlp"  # feed-forward hidden width
HEADS = "heads"  # attention heads × head dim, fused (q/k/v output, attention output input)
KV = "kv"  # per-head feature axis (q/k norm scales)
NORM = "norm"  # 1-D norm scales and biases over the width
CONV_IN = "conv_in"  # convolution input channels
CONV_OUT = "conv_out"  # convolution output channels
CONV_SPACE = None  # convolution kernel taps (time/height/width): never sharded
COND = "cond"  # conditioning widths (timestep embedding, face-token input)

# Activation axes.
BATCH = "batch"
LENGTH = "length"  # token sequence

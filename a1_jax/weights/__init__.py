"""PyTorch/safetensors -> Flax params. Each model's rule table lives in its own module here."""

from a1_jax.weights.rules import (CONV2D, CONV3D, IDENTITY, LINEAR, ImportPlan, Rule, Transform, apply_plan,
                                  import_params, plan_import)
from a1_jax.weights.safetensors_io import SafetensorsCheckpoint, open_checkpoint

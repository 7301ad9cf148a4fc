"""Training the SkyReels-A1 DiT (issue 9; spec §7: the reference released no training code).

* `data/`: the clip dataset (`a1-jax make-dataset`), its Grain pipeline, the TFDS builder, the latent cache.
* `config`: the run config (`configs/train/*.yaml`): model and init, stage, data window, optimizer, compute.
* `init`: the model a run starts from, and a CogVideoX-I2V-style transformer grown to SkyReels-A1's inputs.
* `state`: the train state, the stage's trainable parameters, AdamW with warmup-cosine and clipping, shardings.
* `step`: the loss (CogVideoX's v-prediction recipe, as finetrainers / diffusers' I2V example train it) and the
  jitted step; the frozen encoders for frame datasets.
* `trainer`: `a1-jax train`, the loop, its workdir, Orbax checkpoints, metrics and resume.

Only the DiT trains; the VAE, the pose guider and SigLIP are frozen (an assumption: the paper's per-stage details
are unknown). `sampling/` never imports this package, nor this package `sampling/`: what both need lives in
`conditions.py`, `diffusion.py` and `weights/`.
"""

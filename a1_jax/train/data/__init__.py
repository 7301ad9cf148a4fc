"""The training clip dataset: the writer (`writer`, `a1-jax make-dataset`), the record format and index (`records`),
the Grain pipeline that batches it (`pipeline`), a TFDS builder over the same files (`tfds_builder`) and the latent
cache of fixed windows that lets training skip the frozen encoders (`latents`, `make-dataset --latents`)."""

"""Training: the clip dataset and its Grain pipeline (`train/data/`), the train state and step, stages, the loop."""

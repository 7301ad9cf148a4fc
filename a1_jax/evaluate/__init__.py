"""Fidelity of an animation: expression, head pose and landmark motion against its driver, identity against its
reference portrait (`a1-jax evaluate`). Runs from pip packages and the packaged landmarker alone.

`metrics` (pure NumPy), `tracks` (12-fps face tracks, pairing), `identity` (dlib descriptor, optional `eval` extra),
`plot` (matplotlib figure), `report` (one evaluation, a CSV batch, the command).
"""

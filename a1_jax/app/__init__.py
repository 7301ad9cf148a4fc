"""`a1-jax app`: the web app (Gradio, the `app` extra), another caller of `sampling.animate.run_animate`, like the
CLI. `server.build_app` makes the page and its `/animate` API; `server.serve` runs it. Gradio is imported only here."""

"""One tiny-VAE chunk program, timed: the demo's steady decoder chunk (2 latents -> 8 frames of 480x720) and pose-guider
encoder chunk (8 frames of 480x720), random weights (seed 0), fp32 on the default backend.

    PYTHONPATH=$PWD python tools/vae_chunk_bench.py [--repeats 4]

Prints per program the compile CPU seconds and the fastest and median warm call in CPU seconds (all threads) and wall
seconds, as one JSON line. On a shared machine compare CPU seconds, and run the two trees being compared in turns.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from a1_jax.weights import checkpoint


def clocked(f, *args) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    networks = checkpoint.build_networks(checkpoint.ModelConfigs.from_folder("configs/tiny"))
    params = checkpoint.init_params(networks, 0)
    rng = np.random.default_rng(0)
    programs = {
        "decode_chunk": (networks.vae, params["vae"], rng.standard_normal((1, 2, 60, 90, 4), np.float32)),
        "encode_chunk": (networks.pose_guider, params["pose_guider"],
                         rng.uniform(-1, 1, (1, 8, 480, 720, 3)).astype(np.float32)),
    }
    report = {}
    for method, (model, weights, x) in programs.items():
        step = jax.jit(lambda p, x, model=model, method=method: model.apply({"params": p}, x, None, method=method))
        weights, x = jax.device_put(weights), jnp.asarray(x)
        cpu = time.process_time()
        compiled = step.lower(weights, x).compile()
        compile_cpu = time.process_time() - cpu
        clocked(compiled, weights, x)
        runs = sorted(clocked(compiled, weights, x) for _ in range(args.repeats))
        report[method] = {"compile_cpu_s": round(compile_cpu, 2), "warm_cpu_s_min": round(runs[0][0], 3),
                          "warm_cpu_s_median": round(runs[len(runs) // 2][0], 3),
                          "warm_wall_s_min": round(min(wall for _, wall in runs), 3)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""Runs `a1-jax parity` over a set of cases and prints the BUILD_NOTES parity table (markdown).

    python tools/parity_table.py                 # the default cases below
    python tools/parity_table.py vae dit         # only these components

Each row carries the exact command that produced it. Run on the machine you name in BUILD_NOTES.md.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

CASES = {
    "vae": [
        "--config configs/vae_tiny.json --frames 9 --height 32 --width 48",
        "--config configs/vae_tiny.json --frames 17 --height 64 --width 96 --tiling",
        "--config configs/vae_5b.json --frames 9 --height 32 --width 48",
    ],
    "dit": [
        "--config configs/dit_tiny.json",
        "--config configs/dit_tiny.json --seed 1",
    ],
    "siglip": [
        "--config configs/siglip_tiny.json",
    ],
    "scheduler": [
        "--config configs/5b/scheduler",
    ],
    "pipeline": [
        "",  # a random release folder it writes itself
    ],
}


def run(component: str, case: str) -> str:
    command = f"a1-jax parity {component} {case}"
    proc = subprocess.run([sys.executable, "-m", "a1_jax", "parity", component, *shlex.split(case)],
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode not in (0, 1) or not lines:
        return f"| {component} | `{case}` | failed: {proc.stderr.strip().splitlines()[-1:]} | | | `{command}` |"
    result = json.loads(lines[-1])
    return (f"| {component} | {result['config']} | {result['input_shape']} | {result['max_abs_err']:.2e} | "
            f"{result['max_rel_err']:.2e} | {'ok' if result['ok'] else 'FAIL'} | `{command}` |")


def main(components: list[str]) -> None:
    print("| component | config | input | max_abs_err | max_rel_err | verdict | command |")
    print("|---|---|---|---|---|---|---|")
    for component in components or list(CASES):
        for case in CASES[component]:
            print(run(component, case), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

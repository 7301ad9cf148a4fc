"""Our modules against the PyTorch reference on the same weights and inputs (`a1-jax parity` / `a1-jax bench`).

One module per component (`vae`, `dit`, `siglip`); each builds the reference model from a config (random init from a
seed, or a checkpoint folder), imports its weights through our importer, and runs both sides on identical inputs.
Each exposes `parity(args) -> dict` and, where it has one, `bench(args) -> dict`; the dicts are printed by the CLI
as the last line of output. torch, diffusers and transformers are imported only here (the `test` extra).
"""

from __future__ import annotations

import contextlib
import importlib
import statistics
import time
from typing import Any, Callable, Mapping

import numpy as np

from a1_jax.errors import UserError

FP32_TOLERANCE = 1e-5  # max|ours - reference| / max|reference|, fp32 on CPU


def import_reference(module: str) -> Any:
    """Imports a reference library, or tells the user which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"the PyTorch reference needs '{module}': install the test extra "
                        "(pip install -e '.[test]')") from None


def to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor (any dtype, any device) or array as a float32-or-wider NumPy array."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().float().cpu().numpy() if tensor.dtype.is_floating_point else tensor.cpu().numpy()
    return np.asarray(tensor)


def torch_state(module: Any) -> dict[str, np.ndarray]:
    """A torch module's state dict (parameters and persistent buffers) as NumPy arrays."""
    return {name: to_numpy(value) for name, value in module.state_dict().items()}


def perturb_plain_tensors(module: Any, seed: int, scale: float = 0.1, also: tuple[str, ...] = ()) -> None:
    """Adds seeded noise, in place, to every 1-D tensor of a torch module (norm scales, biases) and to the persistent
    tensors whose name ends with one of `also`. Default inits leave norms at exactly 1 and biases at 0, which would
    hide a swapped or dropped mapping; a non-persistent buffer (a computed table) is not a weight and is left alone."""
    torch = import_reference("torch")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.ndim == 1 or name.endswith(also):
                noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                tensor.add_(scale * noise.to(tensor.device))


def errors(outputs: Mapping[str, tuple[Any, Any]]) -> dict[str, dict[str, float]]:
    """Per output `(ours, reference)`: max absolute error and max|Δ| / max|reference|."""
    table = {}
    for name, (ours, ref) in outputs.items():
        ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
        if ours.shape != ref.shape:
            raise AssertionError(f"{name}: our shape {ours.shape} != reference shape {ref.shape}")
        abs_err = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        table[name] = {"max_abs_err": abs_err, "max_rel_err": abs_err / scale if scale > 0 else abs_err}
    return table


def report(component: str, config: str, input_shape: Any, outputs: Mapping[str, tuple[Any, Any]],
           tol: float = FP32_TOLERANCE, **extra: Any) -> dict[str, Any]:
    """The parity JSON: worst errors over all outputs, `ok` iff the worst relative error is within `tol`."""
    table = errors(outputs)
    max_abs = max(row["max_abs_err"] for row in table.values())
    max_rel = max(row["max_rel_err"] for row in table.values())
    return {"component": component, "config": config, "input_shape": list(input_shape), "max_abs_err": max_abs,
            "max_rel_err": max_rel, "tol": tol, "ok": bool(max_rel <= tol), "outputs": table, **extra}


@contextlib.contextmanager
def fp32_reference():
    """Full-precision matmuls on both sides while a parity check runs."""
    import jax

    torch = import_reference("torch")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def time_call(fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any] = lambda x: x) -> float:
    """Median wall seconds of `sync(fn())` over `repeats` calls (call once before to exclude compilation)."""
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)

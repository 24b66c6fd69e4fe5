"""The Keras backend's process-wide settings and identity: deterministic kernels, versions, device.

Determinism has two halves. Environment variables must be set before the backend is imported
(``determinism_env``; the CLI applies them, the workers inherit them); TensorFlow's switch is a
call made once per process, before training (``use_deterministic_ops``).

Decision (measured, CIFAR-10 (JPEG copy) slice, TensorFlow CPU): TensorFlow's deterministic
kernels give different (equally valid) numbers from its default kernels, so a rerun reproduces
an original only in the same mode. Sweeps therefore default to ``deterministic: true``, and the
mode is tagged on every run.

This module imports the backend packages directly, only for these switches (never for layers:
those come from ``keras``); its two ``tensorflow`` imports are the ruff ban's only exemptions.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version

XLA_DETERMINISTIC = "--xla_gpu_deterministic_ops=true"
BACKEND_PACKAGES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
# What must match for a rerun to be expected to reproduce an original bit for bit (tag names).
IDENTITY_TAGS = ("keras_backend", "keras_version", "backend_version", "numpy_version", "python_version", "device")


def determinism_env(deterministic: bool, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables to set (before the backend is imported) for ``deterministic``."""
    if not deterministic:
        return {}
    flags = environ.get("XLA_FLAGS", "")
    changes = {"CUBLAS_WORKSPACE_CONFIG": environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")}  # torch cuBLAS
    if XLA_DETERMINISTIC not in flags:
        changes["XLA_FLAGS"] = f"{flags} {XLA_DETERMINISTIC}".strip()  # JAX on GPU
    return changes


def use_deterministic_ops(deterministic: bool) -> None:
    """Switch this process to deterministic kernels (cannot be switched back). Call once, before
    building models; for JAX the switch is the ``XLA_FLAGS`` of ``determinism_env``."""
    if not deterministic:
        return
    import keras

    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf  # noqa: TID251 (backend switches only, never layers)

        tf.config.experimental.enable_op_determinism()
    elif name == "torch":
        import torch

        torch.use_deterministic_algorithms(True)


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device() -> str:
    """What trains in this process: the first accelerator's name, else ``cpu: <model> (<n> cores)``."""
    import keras

    name = keras.backend.backend()
    accelerator = ""
    if name == "jax":
        import jax

        first = jax.devices()[0]
        accelerator = "" if first.platform == "cpu" else f"{first.platform}: {first.device_kind}"
    elif name == "tensorflow":
        import tensorflow as tf  # noqa: TID251 (backend switches only, never layers)

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            accelerator = f"gpu: {tf.config.experimental.get_device_details(gpus[0]).get('device_name', 'GPU')}"
    elif name == "torch":
        import torch

        if torch.cuda.is_available():
            accelerator = f"gpu: {torch.cuda.get_device_name(0)}"
    return accelerator or f"cpu: {_cpu_name()} ({os.cpu_count()} cores)"


def identity() -> dict[str, str]:
    """The ``IDENTITY_TAGS`` of this process: backend, package versions and device."""
    import keras

    name = keras.backend.backend()
    return {
        "keras_backend": name,
        "keras_version": keras.__version__,
        "backend_version": f"{BACKEND_PACKAGES.get(name, name)}=={_package_version(BACKEND_PACKAGES.get(name, name))}",
        "numpy_version": _package_version("numpy"),
        "python_version": platform.python_version(),
        "device": device(),
    }


# XLA's compile events (JAX's monitoring events): one per program compiled or read from JAX's
# persistent compilation cache, with the seconds of tracing, lowering and compiling.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_compiles = {"programs": 0, "seconds": 0.0, "cache_hits": 0}
_listening: list[bool] = []


def _on_duration(event: str, duration_secs: float, **kwargs: object) -> None:
    if event == _COMPILE_EVENT:
        _compiles["programs"] += 1
    if event == _COMPILE_EVENT or event in _TRACE_EVENTS:
        _compiles["seconds"] += duration_secs


def _on_event(event: str, **kwargs: object) -> None:
    if event == _CACHE_HIT_EVENT:
        _compiles["cache_hits"] += 1


class CompileMeter:
    """XLA compilations since the meter was made (under JAX; None elsewhere: TensorFlow reports
    none): ``compilations`` compiled here, ``cache_hits`` read from JAX's persistent compilation
    cache instead, and ``seconds`` spent tracing, lowering and compiling (or reading)."""

    def __init__(self) -> None:
        import keras

        self.active = keras.backend.backend() == "jax"
        if self.active and not _listening:
            import jax.monitoring

            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            jax.monitoring.register_event_listener(_on_event)
            _listening.append(True)
        self._start = dict(_compiles)

    def _since(self, key: str) -> float | None:
        return _compiles[key] - self._start[key] if self.active else None

    @property
    def cache_hits(self) -> int | None:
        hits = self._since("cache_hits")
        return None if hits is None else int(hits)

    @property
    def compilations(self) -> int | None:
        programs, hits = self._since("programs"), self.cache_hits
        return None if programs is None or hits is None else int(programs) - hits

    @property
    def seconds(self) -> float | None:
        return self._since("seconds")

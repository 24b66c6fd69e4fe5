"""Fault injection for the sweep tests, loaded into every Python process (the spawned workers
too) by putting this folder on PYTHONPATH. It wraps ``cifar_exp.training.train.train`` so that the trials
with the seeds named in the environment fail for real inside their worker:

- CIFAR_EXP_FAULT_RAISE=seed,...  the trial raises RuntimeError
- CIFAR_EXP_FAULT_DIE=seed,...    the worker process dies (os._exit(9)) mid-trial, once per seed (a
                                  marker file in the working folder): the retry, which trains with
                                  its original's seed, lives, as after an OOM kill or a lost host
- CIFAR_EXP_FAULT_OOM=seed,...    the trial asks the OS for 64 TiB (numpy's MemoryError, for real)
"""

import importlib.abc
import importlib.util
import os
import sys

RAISE = {int(s) for s in os.environ.get("CIFAR_EXP_FAULT_RAISE", "").split(",") if s}
DIE = {int(s) for s in os.environ.get("CIFAR_EXP_FAULT_DIE", "").split(",") if s}
OOM = {int(s) for s in os.environ.get("CIFAR_EXP_FAULT_OOM", "").split(",") if s}


class _WrapTrain(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "cifar_exp.training.train":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            real = module.train

            def train(cfg, data, *, epochs, seed, **kwargs):
                if seed in RAISE:
                    raise RuntimeError(f"injected fault for seed {seed}")
                marker = f".cifar_exp_fault_died_{seed}"
                if seed in DIE and not os.path.exists(marker):
                    open(marker, "w").close()
                    os._exit(9)
                if seed in OOM:
                    import numpy

                    numpy.empty(1 << 46, dtype=numpy.uint8)
                return real(cfg, data, epochs=epochs, seed=seed, **kwargs)

            module.train = train

        spec.loader.exec_module = patched
        return spec


if RAISE or DIE or OOM:
    sys.meta_path.insert(0, _WrapTrain())

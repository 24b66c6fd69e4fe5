"""The Optuna engine of a sweep (``python -m cifar_exp.sweep``, see ``__main__``): the study and
its budget in Optuna storage (``storage``), the space as suggestions (``space``,
``hyperparameters``), the worker processes that claim and run trials (``worker``), the command's
supervisor that starts, watches and replaces them (``supervisor``), their heartbeats and the files
beside the store (``liveness``, ``sidecar``), the events they send (``events``); and the
KerasTuner engine beside it (``tuner``). One trial's run is ``cifar_exp.lifecycle``."""

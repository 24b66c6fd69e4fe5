"""The optimizer of a trial, its learning-rate schedule and the plateau rule, with every searched
number held in a variable of the optimizer's state instead of a constant of the compiled step.

Decision: a compiled train step takes the model's and the optimizer's variables as arguments (JAX)
or reads them by reference (TensorFlow); every Python number it reads is a constant of the
program. So two trials that differ only in learning rate, schedule, momentum or weight decay run
one compiled program when these numbers are variables (``programs`` reuses it), where Keras'
schedule classes and ``SGD(momentum=...)`` would bake each trial's numbers into a new program.
The schedule kind is a variable too: constant, step, exponential, cosine, cosine with warmup and
one-cycle are one formula, selected at run time; plateau is the constant kind with a ``scale``
the ``Plateau`` callback lowers.
"""

from __future__ import annotations

import math

import keras

from cifar_exp.config import TrainConfig

KINDS = ("constant", "step", "exponential", "cosine", "cosine_warmup", "one_cycle")
MAX_BOUNDARIES = 9  # TrainConfig.step_stages is at most 10
_NEVER = 1e30  # an unused step boundary
ONE_CYCLE_START_DIV, ONE_CYCLE_END_DIV = 25.0, 1e4  # PyTorch's OneCycleLR defaults


def schedule_numbers(cfg: TrainConfig, epochs: int, steps_per_epoch: int, rate: float | None = None) -> dict:
    """The values of ``Schedule``'s variables for ``cfg`` over ``epochs`` epochs (or the constant
    ``rate``): plain numbers, computed here once per trial."""
    lr, total = (cfg.peak_learning_rate if rate is None else rate), max(1, epochs * steps_per_epoch)
    kind = "constant" if rate is not None or cfg.lr_schedule == "plateau" else cfg.lr_schedule
    boundaries = [_NEVER] * MAX_BOUNDARIES
    warmup, span = 0.0, float(total)
    if kind == "step":
        # e.g. 3 stages: lr, lr*0.1, lr*0.01 over three equal thirds of training. A step takes
        # a stage's value up to and including its boundary, hence the - 1.
        for i in range(1, cfg.step_stages):
            boundaries[i - 1] = float(round(total * i / cfg.step_stages) - 1)
    elif kind == "cosine_warmup":
        warmup = float(min(cfg.warmup_epochs * steps_per_epoch, total - 1))
        span = total - warmup
    elif kind == "one_cycle":
        warmup = max(1.0, cfg.warmup_fraction * total)
        span = max(1.0, total - 1 - warmup)
    return {"kind": float(KINDS.index(kind)), "peak": lr, "scale": 1.0, "boundaries": boundaries,
            "factor": cfg.step_factor, "decay_steps": float(steps_per_epoch), "decay_rate": cfg.decay_rate,
            "warmup": warmup, "span": span}


class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """Every schedule shape of ``TrainConfig.lr_schedule`` over optimizer steps, its numbers in
    variables (``schedule_numbers``):

    - constant: ``peak * scale`` (``Plateau`` lowers ``scale``);
    - step: ``peak * factor**stage``, the stage the count of boundaries the step is past;
    - exponential: ``peak * decay_rate**(step / decay_steps)`` (one decay per epoch);
    - cosine: ``peak`` annealed to 0 over ``span`` steps;
    - cosine_warmup: linear from 0 to ``peak`` over ``warmup`` steps, then cosine over ``span``;
    - one_cycle: PyTorch's ``OneCycleLR``: linear from ``peak / 25`` to ``peak`` over ``warmup``
      steps, then cosine to ``peak / 1e4`` at the last step.

    ``track(optimizer)`` moves the variables into the optimizer's state, where a compiled train
    step reads them as arguments."""

    def __init__(self, numbers: dict) -> None:
        self.numbers = dict(numbers)
        self.values = {name: keras.Variable(value, dtype="float32", trainable=False, name=name)
                       for name, value in numbers.items()}

    def track(self, optimizer: keras.optimizers.Optimizer) -> None:
        self.values = {name: optimizer.add_variable(keras.ops.shape(variable), name=f"schedule_{name}",
                                                    initializer=keras.initializers.Constant(self.numbers[name]))
                       for name, variable in self.values.items()}

    @property
    def per_step(self) -> bool:
        """Whether the rate changes within an epoch (read from the variable: the kind is runtime)."""
        return int(keras.ops.convert_to_numpy(self.values["kind"])) != KINDS.index("constant")

    def __call__(self, step):  # type: ignore[no-untyped-def]
        ops, v = keras.ops, self.values
        step = ops.cast(step, "float32")
        peak, kind = v["peak"] * v["scale"], v["kind"]
        stage = ops.sum(ops.cast(step > v["boundaries"], "float32"))
        cosine = lambda done: 0.5 * (1.0 + ops.cos(math.pi * ops.clip(done, 0.0, 1.0)))
        after = (step - v["warmup"]) / v["span"]
        start, end = peak / ONE_CYCLE_START_DIV, peak / ONE_CYCLE_END_DIV
        rates = [
            peak,
            peak * ops.power(v["factor"], stage),
            peak * ops.power(v["decay_rate"], step / v["decay_steps"]),
            peak * cosine(step / v["span"]),
            ops.where(step < v["warmup"], peak * step / ops.maximum(v["warmup"], 1.0), peak * cosine(after)),
            ops.where(step < v["warmup"], start + (peak - start) * step / v["warmup"],
                      end + (peak - end) * cosine(after)),
        ]
        rate = rates[0]
        for index, value in enumerate(rates[1:], start=1):
            rate = ops.where(kind == index, value, rate)
        return rate

    def get_config(self) -> dict:
        return {"numbers": self.numbers}


class SGD(keras.optimizers.SGD):
    """Keras' SGD (with Nesterov momentum if ``nesterov``) whose ``momentum`` is a variable of its
    state. It always keeps momentum buffers: with momentum 0 the update is the plain SGD step,
    ``v + (0 * m - g * lr)`` equals ``v - g * lr`` exactly."""

    def __init__(self, learning_rate: Schedule, momentum: float, nesterov: bool, weight_decay: float) -> None:
        super().__init__(learning_rate, momentum=0.0, nesterov=nesterov, weight_decay=weight_decay)
        self.momentum = self.add_variable((), initializer=keras.initializers.Constant(momentum), name="momentum")

    def build(self, variables):  # type: ignore[no-untyped-def]
        if self.built:
            return
        super(keras.optimizers.SGD, self).build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):  # type: ignore[no-untyped-def]
        ops = keras.ops
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        momentum = ops.cast(self.momentum, variable.dtype)
        m = self.momentums[self._get_variable_index(variable)]
        self.assign(m, ops.subtract(ops.multiply(m, momentum), ops.multiply(gradient, learning_rate)))
        if self.nesterov:
            self.assign_add(variable, ops.subtract(ops.multiply(m, momentum), ops.multiply(gradient, learning_rate)))
        else:
            self.assign_add(variable, m)


def learning_rate(cfg: TrainConfig, epochs: int, steps_per_epoch: int, rate: float | None = None) -> Schedule:
    """The learning-rate schedule of ``cfg`` over ``epochs`` epochs (the constant ``rate`` if
    given); it starts from (or peaks at) ``cfg.peak_learning_rate``."""
    return Schedule(schedule_numbers(cfg, epochs, steps_per_epoch, rate))


def optimizer(cfg: TrainConfig, epochs: int, steps_per_epoch: int,
              rate: float | None = None) -> keras.optimizers.Optimizer:
    """``cfg``'s optimizer with its learning-rate schedule (the constant ``rate`` if given); the
    schedule's numbers, SGD's momentum and the weight decay are variables of its state."""
    schedule = learning_rate(cfg, epochs, steps_per_epoch, rate)
    opt: keras.optimizers.Optimizer
    if cfg.optimizer == "sgd":
        opt = SGD(schedule, cfg.momentum, cfg.nesterov, cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamax":
        opt = keras.optimizers.Adamax(schedule)
    else:
        opt = keras.optimizers.Adam(schedule)
    if cfg.optimizer in ("sgd", "adamw"):
        # Keras reads weight_decay as a number or a variable (weights -= weights * wd * lr).
        opt.weight_decay = opt.add_variable((), initializer=keras.initializers.Constant(cfg.weight_decay),
                                            name="weight_decay")
    schedule.track(opt)
    return opt


def schedule_of(opt: keras.optimizers.Optimizer) -> Schedule | None:
    """The optimizer's ``Schedule``, None for another rate (a hypermodel's own optimizer)."""
    rate = getattr(opt, "_learning_rate", None)
    return rate if isinstance(rate, Schedule) else None


class Plateau(keras.callbacks.Callback):
    """Keras' ``ReduceLROnPlateau`` rule on ``val_loss`` (mode min, ``min_delta`` 1e-4, no cooldown,
    no floor): an epoch that does not beat the best by ``min_delta`` adds to a wait; at
    ``patience`` the schedule's ``scale`` is multiplied by ``factor`` and the wait restarts. The
    rate lowered is the next epoch's."""

    MIN_DELTA = 1e-4

    def __init__(self, factor: float, patience: int) -> None:
        super().__init__()
        self.factor, self.patience = factor, patience
        self.best, self.wait = math.inf, 0  # one rule per training phase, so no reset at a fit's begin

    def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
        current = (logs or {}).get("val_loss")
        schedule = schedule_of(self.model.optimizer)
        if current is None or schedule is None:
            return
        if current < self.best - self.MIN_DELTA:
            self.best, self.wait = current, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            scale = schedule.values["scale"]
            scale.assign(scale * self.factor)
            self.wait = 0

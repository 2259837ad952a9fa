"""The learning-rate schedule of one run, counted from the run itself and printed before it trains.

The recipes give the warm-up as a fraction of the run's optimizer steps (``warmup_ratio``). A short offline run
therefore warms up for the same share of its steps as the published 24-epoch run does of its own. An explicit
``--warmup_steps`` is used as given, but only if it is shorter than the run. A longer one is refused before
anything trains (``ScheduleError``, naming the fixes): the learning rate would never reach its peak. This is what
happened when 1,000 warm-up steps were applied to a 76-step run: LoRA and TDLRT both stayed at the majority
class. An explicit warm-up longer than half the run trains, with a warning.
"""

import logging
import math
from dataclasses import asdict, dataclass

from . import RunnerError

logger = logging.getLogger(__name__)

SCHEDULER = "linear"  # TrainingArguments.lr_scheduler_type: linear warm-up from 0, then linear decay to 0
LONG_WARMUP = 0.5  # an explicit warm-up longer than this share of the run trains, with a warning


class ScheduleError(RunnerError, ValueError):
    """A schedule that cannot train: a warm-up not shorter than the run, or a ratio outside [0, 1)."""


@dataclass(frozen=True)
class Schedule:
    total_steps: int  # optimizer steps of the run, as the Trainer counts them on one device
    warmup_steps: int
    counted: str  # how total_steps was counted, e.g. "2,000 examples / batch 32 x 1 epoch"
    warmup_from: str  # "warmup_ratio 0.1" or "--warmup_steps 100"
    scheduler: str = SCHEDULER

    def describe(self, learning_rate: float) -> str:
        return (f"schedule: {self.total_steps:,} optimizer steps ({self.counted}), warm-up {self.warmup_steps:,} "
                f"step{'s' * (self.warmup_steps != 1)} ({self.warmup_from}), learning rate {learning_rate:g}, "
                f"scheduler {self.scheduler} (warm-up from 0, then decay to 0)")

    def record(self, learning_rate: float) -> dict:
        return {**asdict(self), "learning_rate": learning_rate}


def total_steps(n_train: int, batch_size: int, epochs: float, gradient_accumulation_steps: int = 1,
                max_steps: int = -1) -> tuple[int, str]:
    """Optimizer steps of a one-device run, as the Trainer counts them, and how they were counted."""
    if max_steps > 0:
        return max_steps, f"--max_steps {max_steps}"
    batches = math.ceil(n_train / batch_size)
    per_epoch = max(1, math.ceil(batches / gradient_accumulation_steps))
    accumulation = f" / accumulation {gradient_accumulation_steps}" if gradient_accumulation_steps > 1 else ""
    return (math.ceil(epochs * per_epoch),
            f"{n_train:,} examples / batch {batch_size}{accumulation} x {epochs:g} epoch{'s' * (epochs != 1)}")


def plan_schedule(n_train: int, recipe, run) -> Schedule:
    """The schedule of a run on ``n_train`` examples; ``recipe``: ``recipes.Recipe``, ``run``: ``RunArguments``.

    Warm-up: ``recipe.warmup_steps`` if given (must be shorter than the run), else
    ``ceil(recipe.warmup_ratio x steps)`` (as the Trainer rounds a ratio), at most ``steps - 1``.
    """
    steps, counted = total_steps(n_train, recipe.per_device_train_batch_size, recipe.num_train_epochs,
                                 run.gradient_accumulation_steps, run.max_steps)
    if recipe.warmup_steps is None:
        ratio = recipe.warmup_ratio
        if not 0 <= ratio < 1:
            raise ScheduleError(f"--warmup_ratio {ratio:g} is not in [0, 1): it is a fraction of the run's "
                                f"optimizer steps (e.g. 0.06); for a number of steps use --warmup_steps")
        return Schedule(steps, min(math.ceil(ratio * steps), steps - 1), counted, f"warmup_ratio {ratio:.3g}")
    warmup = recipe.warmup_steps
    if warmup < 0 or warmup != int(warmup):
        raise ScheduleError(f"--warmup_steps {warmup} is not a whole number >= 0; for a fraction of the run use "
                            f"--warmup_ratio")
    warmup = int(warmup)
    if warmup >= steps:
        raise ScheduleError(
            f"--warmup_steps {warmup:,} is not shorter than the run: {steps:,} optimizer steps ({counted}), so the "
            f"learning rate would never reach its peak and the run would learn next to nothing. Use a fraction of "
            f"the run instead (--warmup_ratio 0.1, without --warmup_steps), a --warmup_steps below "
            f"{steps:,} (e.g. {max(0, steps // 10)}), or a longer run (--num_train_epochs, more examples)")
    if warmup > LONG_WARMUP * steps:
        logger.warning("--warmup_steps %d is %.0f%% of the run's %d optimizer steps: the learning rate peaks late; "
                       "--warmup_ratio 0.1 (without --warmup_steps) warms up for a tenth of the run",
                       warmup, 100 * warmup / steps, steps)
    return Schedule(steps, warmup, counted, f"--warmup_steps {warmup}")

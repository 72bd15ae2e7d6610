"""When a training run makes its records and checkpoints, read from its config: the one place
that knows the schedule.

- Train lines (the means of a window of steps): every `log_every_steps` and at every checkpoint.
- Evaluations (metrics lines of split `eval`, and `train_eval` when `train_eval_examples` > 0):
  every `eval_every_steps` and at the final step.
- Checkpoints: at every evaluation, every `checkpoint_every_steps` and at the final step (and on
  SIGTERM, which the loop's stop flag says).
- Gradient measurements (the analysis log, one record per BatchNorm policy of `analysis_bn`),
  when the monitor is on (`analysis_every_steps` > 0 or `analysis_steps` not empty): at step 0,
  every `analysis_every_steps`, at each step of `analysis_steps` and at the final step.

The loop's actions (jaxres.train.actions) ask `RecordSchedule` whether they are due at a step,
and which records a restored step still lacks; `Workdir.finished` asks it what a finished run's
final step must hold. Every field read here is bookkeeping: it may change when a run resumes
(the loop writes the schedule in force, `schedule_fields`, into the metrics log at every start,
so the records say which one made them). No JAX here: `Workdir` and the CLI import it cheaply.
"""

from __future__ import annotations

import dataclasses

# The config fields that say when records are made (and the intervals of logs and checkpoints).
SCHEDULE_FIELDS = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "train_eval_examples",
                   "eval_examples", "analysis_every_steps", "analysis_steps", "analysis_batch_size", "analysis_bn",
                   "analysis_unit_jacobians")


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_analysis_steps(value) -> frozenset[int]:
    """`analysis_steps` (a tuple or list of step numbers >= 0) as a set, or a ValueError naming the fix."""
    if not isinstance(value, (tuple, list)) or not all(_is_int(s) and s >= 0 for s in value):
        raise ValueError(f"analysis_steps must be a tuple of step numbers >= 0 at which the gradient monitor also "
                         f"measures, e.g. --config.analysis_steps='(1, 2, 4, 8)' (empty: none); got {value!r}")
    return frozenset(value)


def _check_count(field: str, value, meaning: str) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{field} must be an integer >= 0, {meaning}; got {value!r}")
    return value


def check_train_eval_examples(value) -> int:
    """`train_eval_examples` (an integer >= 0), or a ValueError naming the fix."""
    return _check_count("train_eval_examples", value, "the number of training examples evaluated in eval mode at "
                        "every evaluation (0: none)")


def check_eval_examples(value) -> int:
    """`eval_examples` (an integer >= 0), or a ValueError naming the fix."""
    return _check_count("eval_examples", value, "the number of eval-split examples scored at every evaluation of "
                        "training (0: the whole split)")


def schedule_fields(config_json: dict) -> dict:
    """The schedule fields of a config (its JSON dict), as the loop records them at each start."""
    return {k: config_json[k] for k in SCHEDULE_FIELDS if k in config_json}


@dataclasses.dataclass(frozen=True)
class RecordSchedule:
    """The record schedule of one config (`from_config`; bad values raise ValueError)."""

    num_steps: int
    log_every_steps: int
    checkpoint_every_steps: int
    eval_every_steps: int
    analysis_every_steps: int
    analysis_steps: frozenset[int]
    analysis_bns: tuple[str, ...]  # BatchNorm policies measured at each step (empty: monitor off)
    train_eval: bool

    @classmethod
    def from_config(cls, config) -> RecordSchedule:
        """From a ConfigDict or its JSON dict; fields missing from older configs take their defaults."""
        every = config.get("analysis_every_steps", 0)
        steps = check_analysis_steps(config.get("analysis_steps", ()))
        on = every > 0 or bool(steps)
        bns = tuple(dict.fromkeys(b.strip() for b in str(config.get("analysis_bn", "batch")).split(",") if b.strip()))
        return cls(num_steps=config["num_steps"], log_every_steps=config.get("log_every_steps", 0),
                   checkpoint_every_steps=config.get("checkpoint_every_steps", 0),
                   eval_every_steps=config.get("eval_every_steps", 0),
                   analysis_every_steps=every, analysis_steps=steps, analysis_bns=bns if on else (),
                   train_eval=check_train_eval_examples(config.get("train_eval_examples", 0)) > 0)

    @property
    def monitor_on(self) -> bool:
        return bool(self.analysis_bns)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """The metrics splits of one evaluation, in the order they are written."""
        return ("eval", "train_eval") if self.train_eval else ("eval",)

    def logs(self, step: int) -> bool:
        """A train line: at every checkpoint too, so that no window spans one (a resumed run's
        windows then tile the run)."""
        return _every(step, self.log_every_steps) or self.saves(step)

    def evaluates(self, step: int) -> bool:
        return step >= self.num_steps or _every(step, self.eval_every_steps)

    def saves(self, step: int) -> bool:
        """A checkpoint (at an evaluation, with its eval metrics: a candidate for the best one)."""
        return self.evaluates(step) or _every(step, self.checkpoint_every_steps)

    def measures(self, step: int) -> bool:
        return self.monitor_on and (step == 0 or step >= self.num_steps or step in self.analysis_steps
                                    or _every(step, self.analysis_every_steps))

    def wanted(self, step: int) -> set[str]:
        """The records `step` must have once its checkpoint is saved: its evaluation's splits
        ("eval", "train_eval") and "analysis:<bn>" per policy, where they are due."""
        wanted = set(self.eval_splits) if self.evaluates(step) else set()
        if self.measures(step):
            wanted |= {f"analysis:{bn}" for bn in self.analysis_bns}
        return wanted

"""Training: pure step functions, optimizer and schedules, orbax checkpoints, the loop."""

from jaxres.train.actions import NonFiniteLossError
from jaxres.train.config import apply_overrides, base_config, load_config
from jaxres.train.loop import evaluate_workdir, train_and_evaluate
from jaxres.train.optim import make_optimizer, make_schedule, piecewise_constant, step_decay, warmup_cosine
from jaxres.train.state import TrainState, create_train_state
from jaxres.train.step import cross_entropy, eval_step, train_step

__all__ = [
    "NonFiniteLossError", "TrainState", "apply_overrides", "base_config", "create_train_state", "cross_entropy",
    "eval_step", "evaluate_workdir", "load_config", "make_optimizer", "make_schedule", "piecewise_constant",
    "step_decay", "train_and_evaluate", "train_step", "warmup_cosine",
]

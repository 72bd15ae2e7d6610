"""Experiments: the top layer, composing training (`jaxres.train`) and the gradient analysis
(`jaxres.analysis`) into paper figures. Each is a library function with a `jaxres experiment`
subcommand over it."""

from jaxres.experiments.degradation import run_degradation
from jaxres.experiments.degradation_plots import write_outputs
from jaxres.experiments.degradation_results import collect

__all__ = ["collect", "run_degradation", "write_outputs"]

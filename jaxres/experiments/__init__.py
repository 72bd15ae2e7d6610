"""Experiments: the top layer, composing training (`jaxres.train`) and the gradient analysis
(`jaxres.analysis`) into paper figures. Each is a library function with a `jaxres experiment`
subcommand over it."""

from jaxres.experiments.degradation import run_degradation
from jaxres.experiments.degradation_plots import collect_runs, write_outputs

__all__ = ["collect_runs", "run_degradation", "write_outputs"]

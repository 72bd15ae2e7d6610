"""Scale-out: multi-host start-up, and the parallel drivers (which live with the training
step in jaxres.train.drivers, re-exported here)."""

from jaxres.parallel.distributed import initialize_distributed
from jaxres.train.drivers import AXIS, DRIVERS, Driver, check_batch_size, make_driver

__all__ = ["AXIS", "DRIVERS", "Driver", "check_batch_size", "initialize_distributed", "make_driver"]

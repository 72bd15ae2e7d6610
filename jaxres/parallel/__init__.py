"""Scale-out: the pmap and sharded drivers of the per-device step, multi-host start-up."""

from jaxres.parallel.distributed import initialize_distributed
from jaxres.parallel.drivers import AXIS, DRIVERS, Driver, check_batch_size, make_driver

__all__ = ["AXIS", "DRIVERS", "Driver", "check_batch_size", "initialize_distributed", "make_driver"]

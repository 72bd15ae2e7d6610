"""The exact gradient-propagation lab: how gradients travel back through plain and residual nets.

Pure functions over `(model, variables, inputs)` that see models only through the unit
interface (`model.apply(v, h, start=u, stop=u)`) and the layer probes; see the docs' "Gradient-propagation analysis" page and `jaxres analyze`.
"""

from jaxres.analysis.endtoend import end_to_end, end_to_end_norms, end_to_end_norms_whole
from jaxres.analysis.estimators import confidence_interval, frobenius_sq_hutchinson, frobenius_sq_hutchpp
from jaxres.analysis.forward_stats import forward_statistics
from jaxres.analysis.monitor import TrainingMonitor, read_analysis
from jaxres.analysis.segments import SegmentCache, find_segment
from jaxres.analysis.shattered import arc_inputs, gradient_correlations
from jaxres.analysis.study import StudyResults, run_study
from jaxres.analysis.study_config import Setting, StudyConfig
from jaxres.analysis.unit_jacobian import (
    frobenius_sq_exact,
    jacobian_matrix,
    jacobian_products,
    singular_values_exact,
    spectral_norm_lanczos,
    spectral_norm_power,
)

__all__ = [
    "SegmentCache", "Setting", "StudyConfig", "StudyResults", "TrainingMonitor", "arc_inputs",
    "confidence_interval", "end_to_end", "end_to_end_norms", "end_to_end_norms_whole", "find_segment", "forward_statistics", "frobenius_sq_exact",
    "frobenius_sq_hutchinson", "frobenius_sq_hutchpp", "gradient_correlations", "jacobian_matrix",
    "jacobian_products", "read_analysis", "run_study", "singular_values_exact", "spectral_norm_lanczos",
    "spectral_norm_power",
]

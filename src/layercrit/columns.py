"""The columns of a results row: one declaration read by the engine's rows, the store's schema and the analysis.

A row is one (model, layer, trial, reset) evaluation (``layer == "original"`` for the unmodified model). The names
of the ids and metrics are the paper's, so either tool reads the other's results. The metric columns are declared
by the metrics themselves (:data:`layercrit.measurement.metrics.METRICS`).
"""

from .measurement.metrics import METRIC_COLUMNS
from .measurement.proxies import PROXY_COLUMNS

ID_COLUMNS = ("model_id", "layer", "trial", "reset")
META_COLUMNS = ("computed_in_trial", "kernel", "seed", "data_id", "n_skipped", "model_spec", "engine", "precision",
                "layercrit_version")
# Which images a trial saw and how its layer's interval was made (see layercrit.measurement.estimate): the fixed design's rows
# all start at image 0 and look once.
DESIGN_COLUMNS = ("image_offset", "mirror_of", "pilot", "target_ci", "first_stage", "ci_looks", "capped")
# Block Influence and angular distance of transformer block targets (layercrit.measurement.proxies); NaN elsewhere.
COLUMNS = (*ID_COLUMNS, *METRIC_COLUMNS, *PROXY_COLUMNS, *META_COLUMNS, *DESIGN_COLUMNS)

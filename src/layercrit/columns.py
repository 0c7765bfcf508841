"""The columns of a results row: one declaration read by the engine's rows, the store's schema and the analysis.

A row is one (model, layer, trial, reset) evaluation (``layer == "original"`` for the unmodified model). The names
of the ids and metrics are the paper's, so either tool reads the other's results. A value module: it imports
nothing, so readers of results (the store, the analysis) need none of the measuring code. Each metric column is
computed by its entry of :data:`layercrit.measurement.metrics.METRICS`, in this order (a test checks the two agree).
"""

METRIC_COLUMNS = ("top1_acc", "top5_acc", "loss", "recovered_acc", "pred_cos_sim", "pred_l1_err", "pred_l2_err",
                  "pred_ce_loss", "pred_kl", "agreement", "criticality", "criticality_sd", "nonfinite", "n_images",
                  "criticality_ci", "top1_ci")

ID_COLUMNS = ("model_id", "layer", "trial", "reset")
META_COLUMNS = ("computed_in_trial", "kernel", "tied_with", "seed", "data_id", "n_skipped", "model_spec", "engine", "precision",
                "layercrit_version", "spec_id")
# Which images a trial saw and how its layer's interval was made (see layercrit.measurement.estimate): the fixed design's rows
# all start at image 0 and look once.
DESIGN_COLUMNS = ("image_offset", "mirror_of", "pilot", "target_ci", "first_stage", "ci_looks", "capped")
# Block Influence and angular distance of transformer block targets (layercrit.measurement.proxies); NaN elsewhere.
PROXY_COLUMNS = ("block_influence", "angular_distance")
COLUMNS = (*ID_COLUMNS, *METRIC_COLUMNS, *PROXY_COLUMNS, *META_COLUMNS, *DESIGN_COLUMNS)

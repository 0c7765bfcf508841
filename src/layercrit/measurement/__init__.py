"""Measurement: which layers (``layers``), how they are reset (``resets``), what is measured (``metrics``,
``breakdown``, ``logits``), how the model is run (``trace``, ``folding``, ``engine``), how many draws are spent
(``sequential``, ``estimate``, ``confidence``), and the front door :func:`~layercrit.measurement.measure.measure`
(plus Chatterji et al.'s ``module_criticality``)."""

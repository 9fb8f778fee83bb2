"""medfm.eval: metrics, calibration, bootstrap CIs, plots and self-contained HTML reports.

Modules (imported directly; this package stays light so importing it costs nothing):
``metrics`` (pure metric functions), ``calibration`` (ECE, reliability bins),
``bootstrap`` (patient-level CIs),
``evaluate`` (predictions tables), ``plots`` (matplotlib figures), ``html`` (the generic ``Report`` builder),
``embedding_map`` (PCA / t-SNE), ``adapt_report`` (the label-efficiency report).
"""

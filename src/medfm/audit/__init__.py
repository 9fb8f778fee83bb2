"""medfm.audit: the statistics behind ``medfm audit`` — pure functions over arrays and tables.

Modules (imported directly; this package stays light): ``cross_site`` (train-site x test-site matrix with
patient-level CIs and the internal-to-external drop), ``shift`` (MMD, KS, domain-classifier and output
shift tests, detection sample size), ``ood`` (per-case Mahalanobis / energy / kNN scores and thresholds),
``fairness`` (per-subgroup metrics with fairlearn's MetricFrame, bootstrap CIs, gaps), ``calibration``
(temperature scaling, ECE and reliability bins per group), ``shortcut`` (attribute probes on embeddings,
paired AUROC with the anatomy blanked), ``fast`` (numpy metrics for the bootstraps),
``report`` (assemble audit.json), ``explain*`` (saliency maps and their sanity checks).
"""

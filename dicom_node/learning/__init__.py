"""Learning from the hospital: confirmed diagnoses measure the model live and refresh it.

- `agreement.py`, `drift.py` - the statistics (numpy only: the node installs no scipy or
  scikit-learn): sensitivity and specificity at the bundle's threshold, ROC AUC with a
  bootstrap interval; the two-sample Kolmogorov-Smirnov test of recent scores against the
  bundle's reference distribution.
- `live.py` - the figures per bundle version, from the ledger's scores and the confirmed
  diagnoses (`hospital/hospital.sqlite3`), for the status page, `cxr-node status` and
  `/metrics`.
- `present.py`, `gauges.py` - those figures as text tables and lines, and as Prometheus
  gauges.
- `label_csv.py` - confirmed diagnoses in bulk (`cxr-node label --csv`).
- `export.py`, `training_copy.py` - the labelled instances as a dataset `cxr-train` reads
  (`cxr-node export-dataset`), without patient identifiers.

Recalibration on that dataset is `cxr-train calibrate` (training/calibrate.py).
"""

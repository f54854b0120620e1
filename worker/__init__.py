"""Compute side of the CXR node: the model-bundle contract, shared preprocessing and ONNX inference.

Imported by the node host (preprocessing, manifest), by Celery workers (inference) and by
`training/` (preprocessing, manifest). It never touches the network, the broker or the ledger.
"""

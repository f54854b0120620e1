"""Node host of the CXR node: DICOM SCP, spool, ledger, queue, retrieval, report and delivery."""

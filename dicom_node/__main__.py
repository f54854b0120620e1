"""`python -m dicom_node ...` is the `cxr-node` command."""

from dicom_node.operations.cli import app

app()

"""The summary Secondary Capture: the picture (render) and the DICOM object (builder)."""

"""The lung Segmentation object (builder)."""

"""What goes back to the PACS: the SR, the summary SC, the lung SEG, similar studies, delivery."""

"""C-STORE in: the SCP, which instances are analysed, who may send, the receiver processes."""

"""Running the node: the command line, the processes, the status page, health and metrics."""

"""What the node writes down: the job ledger, the audit trail, the metrics counts, durable files."""

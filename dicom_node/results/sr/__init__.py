"""The Structured Report: its codes and fixed texts (codes), its builder (builder)."""

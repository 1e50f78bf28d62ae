"""Layer selection: LGA's per-layer gradient scores, causal tracing, the proxy sample and the ranking."""

"""The jobs as library calls: typed option sections in, a result object out; the CLI is a thin layer on top."""

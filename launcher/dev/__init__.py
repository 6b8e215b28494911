"""Demo and test helpers: tiny models, generated data, smoke runs, the quickstart, the README reference."""

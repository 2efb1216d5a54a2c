"""Benchmark commands (see `envoygeo bench --help`)."""

"""Decoding of raw records: transport envelopes, then Envoy access-log lines."""

"""A real PROXY-protocol lab (HAProxy -> Envoy) and a Fluent Bit stand-in, for demos and tests."""

"""envoygeo: Envoy/Istio access logs -> true client IP, GeoIP, per-IP rates -> Elasticsearch."""

__version__ = "0.1.0"

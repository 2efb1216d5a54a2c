"""Per-IP enforcement: alerts and IP lists in, gateway policy out.

`decide` turns alerts (from `sources`) and the allow/deny lists into the set of denied
networks, with expiry, the allow list winning and a cap; `render` writes that set as an
Istio AuthorizationPolicy and as an Envoy RBAC filter config loaded through ECDS from a
file; `state` remembers what was written, so the next round can say what changed;
`audit` records every change in Elasticsearch. `envoygeo policy` is the loop around them.
"""

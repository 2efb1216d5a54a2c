"""`envoygeo policy`: alerts and IP lists in, gateway deny policy out, every change
audited. The work is in `pipeline.policy`; this is the loop and the words around it."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from types import FrameType

import click

from pipeline.commands.worker import _load, config_option


@click.command()
@config_option
@click.option("--once", is_flag=True, help="One round, then exit (cron, CI, tests).")
@click.option("--dry-run", is_flag=True,
              help="Print the changes and the diff of every output file; write nothing, "
                   "audit nothing.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=None,
              help="Seconds between rounds. [default: policy.interval_s]")
def policy(config_path: Path | None, once: bool, dry_run: bool,
           interval: float | None) -> None:
    """Deny the addresses that raised rate alerts at the gateway, for a while.

    \b
    Each round:
      1. reads the alerts of the last policy.expire_after_s seconds (the alerts
         index, or the alerts topic with policy.source: kafka);
      2. denies each alerting address until expire_after_s after its latest alert,
         plus every network of policy.deny_files (no expiry); addresses inside
         policy.allow_files are never denied (the allow list wins);
      3. keeps at most policy.max_entries networks: the largest offenders (sum of
         their alerts' counts); the cut is said;
      4. writes policy.envoy_rbac_file (Envoy RBAC via ECDS: Envoy reloads it
         without a restart) and/or policy.istio_file (Istio AuthorizationPolicy
         for the ingress gateway, to kubectl apply);
      5. records every change (added, extended, removed and why, with the alert
         ids) in the Elasticsearch index policy.audit_index.

    Both outputs match the client address the PROXY protocol header gave the
    gateway (Envoy `remote_ip`, Istio `remoteIpBlocks`), not the load balancer.

    \b
    Examples:
      envoygeo policy -c config.yaml --once --dry-run   # what would change
      envoygeo policy -c config.yaml --once             # one round (cron)
      envoygeo policy -c config.yaml                    # a round every interval_s

    \b
    Exit status: 0 done; 1 a round failed (--once); 2 configuration error.
    """
    from elastic_transport import TransportError
    from elasticsearch import ApiError

    from pipeline.policy.decide import PolicyError
    from pipeline.policy.round import run_round
    from pipeline.service_errors import describe_elasticsearch_error
    from pipeline.sinks.elasticsearch import make_client

    settings = _load(config_path)
    p = settings.policy
    if p.envoy_rbac_file is None and p.istio_file is None:
        click.echo("envoygeo: invalid configuration:\n  policy.envoy_rbac_file, "
                   "policy.istio_file: set at least one output", err=True)
        sys.exit(2)
    every = interval or p.interval_s
    stop = {"now": False}

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop["now"] = True

    if not once:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    es = make_client(settings.elasticsearch)
    failed = False
    try:
        while True:
            started = time.monotonic()
            try:
                result = run_round(settings, es, dry_run=dry_run)
            except (TransportError, ApiError) as exc:
                failed = True
                click.echo("policy: round failed, nothing changed: "
                           + describe_elasticsearch_error(exc, settings.elasticsearch),
                           err=True)
            except (PolicyError, ValueError, OSError, RuntimeError, TimeoutError) as exc:
                failed = True
                click.echo(f"policy: round failed, nothing changed: {exc}", err=True)
            else:
                failed = False
                for c in result.changes:
                    click.echo(f"policy: {c.action} {c.entry.cidr}: {c.reason}"
                               + (f" [alerts: {', '.join(c.alert_ids[:5])}]"
                                  if c.alert_ids else ""), err=True)
                written = f"; wrote {', '.join(result.written)}" if result.written else ""
                click.echo(f"policy: {result.summary()}{written}"
                           + (" (dry run: nothing written)" if dry_run else ""), err=True)
                if dry_run:
                    click.echo(result.diff_text or "(no change to any output file)", nl=False)
            if once or stop["now"]:
                break
            while not stop["now"] and time.monotonic() - started < every:
                time.sleep(min(0.5, every))
            if stop["now"]:
                break
    finally:
        es.close()
    sys.exit(1 if failed else 0)

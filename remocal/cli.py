"""The ``turnout connect`` and ``turnout gateway`` subcommands."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from controlplane.auth import read_token
from controlplane.cli import DEFAULT_CONTROL_PLANE
from controlplane.errors import StartupError
from remocal import connect
from remocal.gateway import DEFAULT_REPORT_INTERVAL_S, GatewayOptions, run_gateway
from remocal.tunnel import DEFAULT_DEAD_AFTER_S, DEFAULT_PING_INTERVAL_S


def add_commands(sub: Any) -> None:
    """Add ``connect`` and ``gateway`` to the ``turnout`` subcommands."""
    connect.add_command(sub)
    gateway = sub.add_parser(
        "gateway", help="run the tunnel gateway that turnout connect dials (in the cluster)",
        description="Hold tunnels from machines running turnout connect: each machine upgrades one connection with "
        "a ticket the control plane gave the session's owner; the gateway serves a data port per tunnel that "
        "proxies send the session's requests to, and tells the control plane when a tunnel comes and goes. "
        "See docs/remocal.md.")
    gateway.add_argument("--listen", default="0.0.0.0:18090", metavar="HOST:PORT",
                         help="where machines connect (default 0.0.0.0:18090)")
    gateway.add_argument("--data-host", default=os.environ.get("TURNOUT_GATEWAY_DATA_HOST", "127.0.0.1"),
                         metavar="HOST", help="address the per-tunnel data ports listen on (env "
                         "TURNOUT_GATEWAY_DATA_HOST; default 127.0.0.1; in a pod: 0.0.0.0)")
    gateway.add_argument("--advertise-host", default=os.environ.get("POD_IP", ""), metavar="HOST",
                         help="the address proxies reach the data ports at (env POD_IP; default --data-host)")
    gateway.add_argument("--control-plane", default=os.environ.get("TURNOUT_CONTROL_PLANE", DEFAULT_CONTROL_PLANE),
                         metavar="URL", help=f"the control plane's API (env TURNOUT_CONTROL_PLANE; default "
                         f"{DEFAULT_CONTROL_PLANE})")
    gateway.add_argument("--token-file", metavar="FILE", help="the gateway's credential for the control plane (a "
                         "member of a gateway group, or the control plane's --gateway-token-file); or env "
                         "TURNOUT_TOKEN")
    gateway.add_argument("--ca-file", metavar="FILE", help="PEM CA bundle to verify an https control plane")
    gateway.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve the tunnel port over TLS")
    gateway.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    gateway.add_argument("--id", default=os.environ.get("POD_NAME", ""),
                         help="gateway id reported to the control plane (env POD_NAME; default: the host name)")
    gateway.add_argument("--admin", metavar="HOST:PORT", help="serve /healthz, /tunnels and /metrics here")
    gateway.add_argument("--ping-interval", type=float, default=DEFAULT_PING_INTERVAL_S, metavar="SECONDS",
                         help=f"keepalive PING interval on each tunnel (default {DEFAULT_PING_INTERVAL_S:g})")
    gateway.add_argument("--dead-after", type=float, default=DEFAULT_DEAD_AFTER_S, metavar="SECONDS",
                         help=f"a tunnel with no frame for this long is lost (default {DEFAULT_DEAD_AFTER_S:g})")
    gateway.add_argument("--report-interval", type=float, default=DEFAULT_REPORT_INTERVAL_S, metavar="SECONDS",
                         help=f"how often each tunnel's counts go to the control plane, renewing its lease "
                         f"(default {DEFAULT_REPORT_INTERVAL_S:g})")
    gateway.add_argument("--max-tunnels", type=int, default=256, metavar="N",
                         help="tunnels held at once; more are refused with 503 (default 256)")
    gateway.set_defaults(func=_cmd_gateway)


def _cmd_gateway(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        sys.stderr.write("turnout gateway: --tls-cert and --tls-key go together\n")
        return 2
    try:
        token = read_token(args.token_file, "--token-file") if args.token_file else \
            (os.environ.get("TURNOUT_TOKEN", "").strip() or None)
    except StartupError as exc:
        sys.stderr.write(f"turnout gateway: {exc}\n")
        return 2
    if token is None:
        sys.stderr.write("turnout gateway: give the gateway's credential with --token-file (or env TURNOUT_TOKEN)\n")
        return 2
    return run_gateway(GatewayOptions(
        listen=args.listen, data_host=args.data_host, advertise_host=args.advertise_host,
        control_plane=args.control_plane, token=token, ca_file=args.ca_file, tls_cert=args.tls_cert,
        tls_key=args.tls_key, gateway_id=args.id, admin=args.admin, ping_interval_s=args.ping_interval,
        dead_after_s=args.dead_after, report_interval_s=args.report_interval, max_tunnels=args.max_tunnels))

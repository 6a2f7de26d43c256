"""Remocal: a session's sandbox can be a process on a developer's or an agent's machine.

``connect.py`` is ``turnout connect`` (the machine's side), ``gateway.py`` is ``turnout
gateway`` (the cluster's side), ``tunnel.py`` what both share. The control plane's side
(tickets, which gateway holds which tunnel) is ``controlplane/tunnels.py``. See
docs/remocal.md.
"""

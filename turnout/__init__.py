"""turnout: the pieces both the data plane and the control plane use.

``turnout.v1`` is the config channel's wire protocol (the ``.proto`` source, its generated
modules and the conversion between its messages and ``filters`` sessions); ``turnout.cli``
is the ``turnout`` command, which dispatches to the data plane's and the control plane's
commands. ``dataplane`` and ``controlplane`` import this package; neither imports the other.
"""

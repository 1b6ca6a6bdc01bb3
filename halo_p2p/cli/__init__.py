"""The ``halo-peer`` command line and terminal UI (the only place that prints or imports rich)."""

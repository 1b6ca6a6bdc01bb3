"""Session logic: generation and evaluation loops over an :class:`~halo_p2p.engine.Engine`."""

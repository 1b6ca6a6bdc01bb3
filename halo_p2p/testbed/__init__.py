"""The testbed: what emulates hardware and networks halo-p2p runs on, for tests and benchmarks.

* :mod:`~halo_p2p.testbed.sim`: a discrete-event simulator of the protocol on modelled devices
  (a Raspberry Pi cluster on 1 GbE; ``benchmarks/projection.py``).
* :mod:`~halo_p2p.testbed.netns`: an emulated LAN of Linux network namespaces on a bridge (root
  only), with loss by nftables on the bridge ports and delay and jitter by
  :mod:`~halo_p2p.testbed.shim`, a userspace L2 shim between TAP devices.

The product does not import this package. The one exception is the CLI command that exists to
run a test swarm (``halo-peer swarm``, :mod:`halo_p2p.cli.swarm_cmd`). Loss emulated inside a
peer's own links (loopback swarms without namespaces) is
:class:`~halo_p2p.net.lossy.LossyLink`, a :class:`~halo_p2p.net.link.Link` wrapper in the net
layer.
"""

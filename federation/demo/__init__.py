"""``isthmus demo``: a whole federation on one machine (network namespaces as root).

``harness`` starts the processes (etcd, the federation service, per cluster the sample
services, ``isthmus export`` and a gateway) and makes calls across them; ``_netns`` builds
the network-namespace "clusters"; ``samples`` and ``probe`` are the sample services and
the calling workload; ``cli`` is ``isthmus demo``.  The end-to-end tests use the same
building blocks.
"""

"""``isthmus demo``: a whole federation on one machine (network namespaces as root)."""

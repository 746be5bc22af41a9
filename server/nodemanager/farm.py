"""``twistd dsmt-nodefarm``: many node managers in one process (see ``dsmt.server.nodemanager.daemon``).

::

    twistd -n dsmt-nodefarm --nodes 50 --name 'n{n:03d}.farm.test' --state-dir farm/ \\
        --ticket-ca ca.pem --allow-unsigned --http tcp:0:interface=127.0.0.1 --nodes-file farm/nodes.txt
"""
from dsmt.server.nodemanager.daemon import FarmOptions as Options, makeService

__all__ = ["Options", "makeService"]

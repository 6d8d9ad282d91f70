"""``ray start`` for a second node that joins a head on 127.0.0.1 (the local stack's), for tests/test_two_nodes.py.

Ray starts worker nodes only in cluster mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``), and cluster mode rewrites
a head address of 127.0.0.1 into this machine's outward address, where the stack's head does not listen (it binds
the loopback only, by design). This keeps cluster mode and the address as given. Test-only: a real second machine
joins with the head's routable address and needs none of this.
"""

import sys

import ray._private.services as services

services.resolve_ip_for_localhost = lambda host: host

from ray.scripts.scripts import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

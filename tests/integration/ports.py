"""Free loopback ports for the integration tests' servers (SeaweedFS, `ray start`)."""

import socket


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all held open until chosen)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)
            # SeaweedFS also binds port + 10000 (its gRPC port): keep that one free as well
            if port not in ports and port + 10000 not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports

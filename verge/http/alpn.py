"""Protocol selection on a TLS listener: HTTP/2 when ALPN chose "h2", else HTTP/1.1.

asyncio (and uvloop) call ``connection_made`` of the application protocol only once the TLS
handshake is done, so the negotiated ALPN protocol is known there; the dispatcher then hands
the transport to the right protocol object and steps aside.
"""

from __future__ import annotations

import asyncio

from verge.http.h2server import H2ServerProtocol
from verge.http.server import LISTEN_BACKLOG, HttpServerProtocol, ServerLimits


class AlpnDispatch(asyncio.Protocol):
    def __init__(self, app, limits: ServerLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.app, self.limits, self.loop = app, limits, loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        cls = H2ServerProtocol if alpn == "h2" else HttpServerProtocol
        protocol = cls(self.app, self.limits, self.loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


async def serve_tls(app, sock, limits: ServerLimits, ssl_context) -> asyncio.AbstractServer:
    """Serve ``app`` over TLS on a bound socket, HTTP/2 or HTTP/1.1 by ALPN (with the long
    accept queue of verge.http.server.serve: asyncio would listen again with 100)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: AlpnDispatch(app, limits, loop), sock=sock,
                                    ssl=ssl_context, ssl_handshake_timeout=limits.header_timeout,
                                    backlog=LISTEN_BACKLOG)

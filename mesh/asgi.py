"""The whole reference mesh as one ASGI application: the agents' endpoint
(`/agents/connect`), the control plane (spec 6) and the dashboard on the port of whatever
ASGI server runs it (uvicorn, hypercorn), or mounted beside an application's own routes.

    parts = make_parts(registry, "https://mesh.example:8443", secrets)
    app = asgi_app(parts)  # uvicorn module:app --ws-per-message-deflate false (and TLS)
    # or, mounted after the application's own routes (Starlette tries them in order):
    # Starlette(routes=[Route("/hello", hello), Mount("/", app=app)],
    #           lifespan=app.lifespan_context)

It is `svantic_adapters.asgi.AsgiMesh` with `AsyncMesh.http_app` as its `http_app`, and the
`AsyncMesh` (its fleet timer, its HTTPS client) as its `lifespan`: served alone, the ASGI
lifespan runs it; mounted, the framework's lifespan must (`app.lifespan_context`), since a
mounted application gets no lifespan events. `public_url` (in the parts) is where agents are told to
connect, so it must be the address the server is reached at: an ASGI application cannot
learn its port.
"""

from __future__ import annotations

from typing import Any

from svantic_adapters.asgi import AsgiMesh

from .app import AsyncMesh, MeshParts

__all__ = ["asgi_app"]


def asgi_app(parts: MeshParts, **mesh_options: Any) -> AsgiMesh:
    """One ASGI application serving the mesh of `parts` (one server run: the `AsyncMesh`
    inside is entered once). `mesh_options` are `AsgiMesh`'s own (`config`,
    `shutdown_grace`, `max_connections`, ...); the HTTP body bound defaults to the control
    plane's (`MeshSettings.max_body_bytes`), so both refuse the same bodies. The registry
    stays the caller's to close."""
    mesh = AsyncMesh(parts)
    mesh_options.setdefault("max_http_body_bytes", parts.settings.max_body_bytes)
    server = AsgiMesh(verify_token=parts.verify_token, lookup_instance=parts.lookup_instance,
                      dispatch_auth=parts.dispatch_auth(), http_app=mesh.http_app,
                      lifespan=mesh, **mesh_options)
    mesh.attach(server)
    return server

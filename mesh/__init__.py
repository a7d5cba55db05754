"""The reference mesh: the section 6 control plane, a registry, routing and health, tool
calls, hosted dispatch, events, metrics and a dashboard, on the mesh runtime and adapters.

An application above `svantic_proto` and `svantic_adapters`: the pure parts (the control
plane's answers, routing, events) take `now` like the core does; `svantic_mesh.app` runs
them on an adapter, and `svantic mesh` runs that from the command line.
"""

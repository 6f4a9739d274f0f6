"""The operator console: a browser view of tasks, evidence and the ledger (`--console-listen`).

See docs/console.md. `start_console` is the one entry point; the control
plane calls it when started with a console address, and nothing else imports
this package (starlette and jinja2 load only then).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tether.grpcutil.tls import ServerTLS

if TYPE_CHECKING:
    from tether.control.console.server import ConsoleServer
    from tether.control.server import RunningControl


async def start_console(running: RunningControl, listen: str, tls: ServerTLS) -> ConsoleServer:
    """Serves the console for `running` on `listen` ("host:port", port 0 ok).

    Raises:
        ConfigError: the address cannot be bound, or the console's packages are missing.
    """
    from tether.core.errors import ConfigError

    try:
        from tether.control.console.app import Console
        from tether.control.console.server import ConsoleServer
    except ImportError as err:
        raise ConfigError(
            f"the console needs the {err.name} package: reinstall tether (pip install tether)"
        ) from err
    console = Console(running)
    server = ConsoleServer(console.app, listen, tls)
    server.on_stop = console.stopping.set
    await server.start()
    return server

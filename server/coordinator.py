"""The coordinator's command line, `python -m server.coordinator COMMAND FED ...`: provision,
superlink, register, bundle, launch, resume, status, release (docs/coordinator.md).

The commands are the server's deployment room's (server/deploy/commands.py, which lists them
with their options); this module is only the documented way in. `dashboard` goes straight to its
own module (server/deploy/dashboard/serve.py), before the other commands are imported: the
dashboard runs beside the SuperLink for weeks, and their machinery (torch) would hold its memory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["dashboard"]:
        from server.deploy.dashboard.serve import main as dashboard_main

        return dashboard_main(args[1:])
    from server.deploy.commands import main as commands_main

    return commands_main(args)


if __name__ == "__main__":
    sys.exit(main())

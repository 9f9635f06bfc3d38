"""The coordinator's command line, `python -m server.coordinator COMMAND FED ...`: provision,
superlink, register, bundle, launch, resume, status, release (docs/coordinator.md).

The commands are the server's deployment room's (server/deploy/commands.py, which lists them
with their options); this module is only the documented way in.
"""

from __future__ import annotations

import sys

from server.deploy.commands import main

if __name__ == "__main__":
    sys.exit(main())

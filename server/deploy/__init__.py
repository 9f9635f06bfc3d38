"""The server's process supervision: the coordinator's commands (provisioning, the SuperLink and
nginx under supervision, registration, the Flower app and its bundle, launches), and every change
to Flower's code on the server's side. The learning code they run (the ServerApp, its round, the
strategy) is the `server` package's top level."""

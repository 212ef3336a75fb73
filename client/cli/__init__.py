"""The ``tidings`` command: ``serve`` runs the broker (tidings.broker.serve); every
other command talks to a running broker through the client library."""

"""The tidings broker daemon: ``tidings serve`` or ``python -m tidings.broker``. The composition
root is app.py (Broker); net/ holds the connection actor, durable/ queues, streams and the store,
security/ authentication, permissions and audit, ops/ metrics, health, backup and limits."""

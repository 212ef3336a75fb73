"""Several brokers on one PostgreSQL database (issue 13, docs/SCALING.md).

* membership.py: ``Membership``: this broker's row in ``tidings_brokers``, its lease
  renewed in database time, the peers alive, "a peer died" callbacks;
* mesh.py: ``Mesh``: one route (connection) per pair of brokers, dialed by the broker
  with the smaller id, interest tables, the forwarding of pub/sub messages;
* route.py: ``Route``: one route's actor (handshake, reader, batching writer).

Only ``broker.app`` builds these, and only with ``cluster = true``.
"""

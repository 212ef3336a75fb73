"""The schema registry: JSON Schema versions with compatibility modes, subject
bindings and validation of publishes at the door.

    registry.py   SchemaRegistry: the state, its CALL methods, the publish check
    compat.py     the compatibility checker (backward/forward/full, transitive)
    validator.py  document checks and compilation, payload decoding, violations

It sits beside the durable layer: it keeps its state through the durable
store's schema operations and is wired by the composition root (broker/app.py),
which hands the connections its publish check. It imports neither the network
layer nor the composition root.
"""

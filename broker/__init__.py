"""The tidings broker daemon. Start it with `tidings serve` or `python -m broker serve`."""

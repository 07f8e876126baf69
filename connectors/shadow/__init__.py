"""Shadow targets: where Propose-and-Verify replays a candidate (built-in runtime or HTTP)."""

"""Stage 3: Propose-and-Verify, from a trigger to a signed patch in the outbox."""

"""Annotated traces: TRAIL and the plain format, for `import-trail` and `eval-modes`.

TRAIL: `model.py` (span trees and annotations, typed), `parse.py` (reading a split from disk),
`taxonomy.py` (its categories), `otlp.py` (a trace as OTLP spans), `pack.py` (spans into export
requests that fit a message), `labels.py` (annotations as feedback, and the gold categories),
`publish.py` (to Kafka), `trees.py` (span trees for checking a round trip). `annotated.py` loads
TRAIL and the plain format alike for scoring modes.
"""

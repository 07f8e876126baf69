"""Annotated traces: TRAIL and the plain format, for `import-trail` and `eval-modes`."""

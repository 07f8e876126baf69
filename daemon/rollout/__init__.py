"""Stage 4: the canary judge, from a deployed patch to promote or roll back."""

"""HTTP: the daemon's API and the user's HTTP evaluator."""

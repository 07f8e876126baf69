"""`cegraph demo`: the whole loop on the embedded default or over Kafka, and its report."""

"""Stage 1: spans from Kafka (or in process) become executions, exactly once in effect."""

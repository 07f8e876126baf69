"""Stage 2: failures, their signatures, the modes over them, their mass and the triggers."""

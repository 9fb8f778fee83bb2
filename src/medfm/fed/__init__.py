"""medfm.fed."""

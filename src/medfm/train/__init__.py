"""medfm.train."""

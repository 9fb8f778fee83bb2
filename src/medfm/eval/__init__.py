"""medfm.eval."""

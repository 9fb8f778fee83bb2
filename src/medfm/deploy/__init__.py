"""medfm.deploy."""

"""medfm.trust."""

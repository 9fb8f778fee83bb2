"""medfm.data.readers."""

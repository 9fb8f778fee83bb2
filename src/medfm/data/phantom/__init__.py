"""medfm.data.phantom."""

"""medfm.tasks."""

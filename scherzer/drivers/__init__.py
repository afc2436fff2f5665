"""drivers subpackage."""

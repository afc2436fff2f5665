"""clients subpackage."""

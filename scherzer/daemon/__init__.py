"""daemon subpackage."""

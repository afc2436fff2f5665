"""simulators subpackage."""

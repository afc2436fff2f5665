"""Scherzer: TEM/STEM control daemon, faithful simulators and image processing."""

__version__ = "0.1.0"

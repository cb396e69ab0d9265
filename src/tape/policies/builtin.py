"""Imports every built-in policy module, so that each registers itself."""

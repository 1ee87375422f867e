"""Dock widgets (thin: each wraps a core generator in a worker and maps its events onto the UI)."""

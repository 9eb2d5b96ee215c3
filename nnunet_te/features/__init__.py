"""Feature extraction: networks, forward hooks and class-balanced sampling."""

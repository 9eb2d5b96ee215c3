"""Scoring a zoo with registry metrics and writing the ranking."""

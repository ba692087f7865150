"""Instrumentation: the timeline of a stage's work and the memory its saved activations take."""

"""Scripted scenarios (``paylab scenarios``): the format, the judging of steps, the
results, the runner, and the scenarios shipped with paylab. See ``docs/scenarios.md``."""

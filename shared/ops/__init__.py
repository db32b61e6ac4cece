"""What an operator sets and sees of a running service: settings, logs, metrics."""

"""The links (trio): framed listeners and multiplexed connections, the ISO and HSM link
dialects, TLS, connection pools and upstreams with retry and a circuit breaker."""

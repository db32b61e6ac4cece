"""Pure policies with injected clocks: backoff and retry budgets, the circuit breaker,
rate limits and connection caps. No I/O."""

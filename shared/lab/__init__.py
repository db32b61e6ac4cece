"""The lab bench above the services: it starts them, drives them, breaks them and watches
them (network, chaos, scenarios, course labs, demo, bench, top). Services never import it."""

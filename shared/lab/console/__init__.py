"""The console in the browser: a page served on the gateway's HTTP port (``/console``),
plain HTML, CSS and JavaScript shipped as package data (``static/``), no build step.
:mod:`shared.lab.console.routes` serves it and its two JSON answers (the live view and
one transaction's ladder), both built by the lab's own code (``top``, ``trace``)."""

"""The dashboard and the REST API of the service (``nanobot.web.app.setup_dashboard``).

Kept free of imports here: the configuration reads :mod:`nanobot.web.tokens` without loading
aiohttp or Jinja2.
"""

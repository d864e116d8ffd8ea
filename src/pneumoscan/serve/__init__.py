"""Serving: the FastAPI service (uploads, limits, security headers, web page)."""

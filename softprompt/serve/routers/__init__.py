"""The HTTP routes, one small router per concern, each over the app's `Service` (service.py)."""

from fastapi import Request


def service(request: Request):
    """The app's Service (a FastAPI dependency)."""
    return request.app.state.service

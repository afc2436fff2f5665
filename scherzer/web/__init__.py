"""The live web view: queue, history, the running job, its frames, plots and reports in a
browser, with the API's roles (observers see; operators may pause, resume and cancel).

Optional (extra ``web``: Starlette + uvicorn), off by default, loopback by default. It talks to
the daemon only through the Python client and the PUB events. See ``docs/web.md``.
"""

from scherzer.web.settings import WebSettings, WebUser

__all__ = ["WebSettings", "WebUser", "create_app", "run_web", "start_web"]


def __getattr__(name: str):
    """Import the server parts (Starlette, uvicorn) only when used: settings stay light."""
    if name not in ("start_web", "run_web", "create_app"):
        raise AttributeError(name)
    try:
        from scherzer.web import app, server
    except ImportError as exc:
        raise ImportError(
            f"the web view needs the 'web' extra ({exc}): pip install 'scherzer[web]'"
        ) from exc
    return app.create_app if name == "create_app" else getattr(server, name)

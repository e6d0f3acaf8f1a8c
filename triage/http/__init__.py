"""The service over HTTP: `app.create_app` assembles the routers, dependencies, middleware and error answers."""

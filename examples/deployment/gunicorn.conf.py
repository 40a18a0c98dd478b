"""gunicorn.conf.py: the deployment guide's logging (docs/deployment.md).

gunicorn reads ``gunicorn.conf.py`` from its working directory (``-c`` names another file).
"""

# gunicorn sets up its own loggers only. Without this, aiodelay's INFO lines and the access log
# of the runner that the app's factory returns (the "aiohttp.access" logger) reach no handler,
# and nothing of them appears. gunicorn merges this dict into its defaults
# (gunicorn.glogging.CONFIG_DEFAULTS: the root logger at INFO, on stdout, with gunicorn's
# "[time] [pid] [level]" format); its own loggers keep their settings (--log-level,
# --error-logfile).
logconfig_dict = {
    "loggers": {
        "aiodelay": {"level": "INFO"},  # one line per request whose client left, or timed out
        "aiohttp.access": {"level": "INFO"},  # one line per request
    },
}

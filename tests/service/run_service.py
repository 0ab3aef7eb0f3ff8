"""Subprocess entry of the service tests:
``run_service.py worker|api|serve DATA_DIR SETTINGS RUNNER [PORT]``.

``worker`` calls ``multitalk.service.cli_commands.worker`` (what ``multitalk worker`` runs);
``api`` calls ``serve`` without an in-process worker; ``serve`` calls it with one (what
``multitalk serve`` runs).
"""

import json
import logging
import sys

from multitalk.service.cli_commands import serve, worker

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
role, data_dir, settings, runner_options = sys.argv[1:5]
settings, runner_options = json.loads(settings), json.loads(runner_options)
if role == "worker":
    worker(data_dir, "media_runner:MediaRunner", runner_options=runner_options, **settings)
elif role in ("api", "serve"):
    serve("127.0.0.1", int(sys.argv[5]), data_dir, "media_runner:MediaRunner",
          runner_options=runner_options, in_process_worker=role == "serve",
          log_level="warning", **settings)
else:
    raise SystemExit(f"unknown role {role}")

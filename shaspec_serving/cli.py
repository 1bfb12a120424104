"""The ``shaspec`` program: the library's command line (:mod:`shaspec_tf.cli`) with the serving app's ``serve``.

    shaspec serve --model-base BASE [--grpc-port 8500] [--rest-port 8501] [--host 127.0.0.1] [--poll-seconds 2]
                  [--max-request-bytes 1GiB] [--read-timeout 30]
    shaspec COMMAND ...            every library command (demo, info, prepare, train, evaluate, predict, export)

The console script ``shaspec`` (setup.py) runs :func:`main`; ``python -m shaspec_serving.cli`` is the same program. The
library knows nothing of this module: the dependency goes from the app to the library only, and the app hands its
commands to :func:`shaspec_tf.cli.main` (see :class:`shaspec_tf.cli.Command`).
"""
from __future__ import annotations

import argparse
import logging
import sys

from shaspec_tf import cli


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-base", required=True, help="folder of NAME/VERSION SavedModels (a path or a gs:// "
                                                            "URI)")
    parser.add_argument("--grpc-port", type=int, default=8500)
    parser.add_argument("--rest-port", type=int, default=8501)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; another address exposes "
                             "the server, which has no authentication and no TLS, and logs a warning)")
    parser.add_argument("--poll-seconds", type=float, default=2.0, help="how often to look for new versions")
    parser.add_argument("--max-request-bytes", help="largest request, in bytes or with K/M/G (binary) units, e.g. "
                                                    "512MiB (default 1GiB): gRPC message, REST body, decoded inputs")
    parser.add_argument("--read-timeout", type=float, help="seconds a REST client may send nothing before it is "
                                                           "dropped (default 30)")


def run_serve(args, extra) -> int:
    """``shaspec serve``: :func:`shaspec_serving.server.serve` in the foreground, its log (INFO) on stderr."""
    try:
        from shaspec_serving.server import serve
    except ImportError as error:
        raise OSError(f"serving needs the 'serving' extras (pip install -e .[serving]): {error}") from error
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    limits = {key: value for key, value in (("max_request_bytes", args.max_request_bytes),
                                            ("read_timeout_s", args.read_timeout)) if value is not None}
    return serve(args.model_base, args.grpc_port, args.rest_port, args.host, args.poll_seconds, **limits)


SERVE = cli.Command("serve", help="serve every model under a base folder over gRPC and REST with plain TensorFlow "
                                  "(TF Serving's APIs; new versions are picked up)",
                    add_arguments=add_serve_arguments, run=run_serve)
COMMANDS = (SERVE,)


def main(argv=None) -> int:
    """The installed ``shaspec`` command: the library's commands and :data:`COMMANDS`."""
    return cli.main(argv, commands=COMMANDS)


if __name__ == "__main__":
    sys.exit(main())

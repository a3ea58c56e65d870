"""Small JSON files shared between processes (the compile policy's cache
directory): read as a dict, written atomically."""

import contextlib
import json
import logging
import os
import tempfile

logger = logging.getLogger("posteriors_fast")


def read_json(path: str) -> dict:
    """The JSON object in ``path``; ``{}`` when it is missing, unreadable or
    not an object."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:
        if os.path.exists(path):
            logger.debug("posteriors_fast: ignoring unreadable %s (%s)", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: str, data: dict) -> bool:
    """Write ``data`` to ``path`` through a temporary file in the same
    directory and a rename, so a concurrent reader sees the old file or the
    new one, never a part. Returns False (logged at DEBUG, no temporary file
    left) when it cannot be written."""
    directory = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
        tmp = None
        return True
    except (OSError, TypeError, ValueError) as err:
        logger.debug("posteriors_fast: %s not written (%s)", path, err)
        return False
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

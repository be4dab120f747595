"""Delta Sampling core: host-free (imports torch only, never the WebUI's `modules`).

Read top-down: spec -> schedules -> latent -> delta -> source (pair, run) -> lora.
"""

import logging

LOGGER_NAME = "delta_sampling"
logger = logging.getLogger(LOGGER_NAME)
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[Delta Sampling] %(levelname)s: %(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)


class DeltaError(ValueError):
    """A user-facing error: the message says what is wrong and what to do."""

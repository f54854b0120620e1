"""Library-wide options, set once when a node process starts (`serve`, a worker, a receiver),
never as a side effect of importing a module."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from pydicom import config as pydicom_config
from pynetdicom import _config


def configure_libraries(
    receive_into: Path | None = None, decode_threads: int | None = None
) -> None:
    """Set what the node needs of pydicom, pynetdicom and highdicom in this process.

    receive_into: a receiver process's folder for incoming data sets (see
    `dicom_node.receiving.processes`): pynetdicom then writes each one to a file there as its
    fragments arrive, instead of holding it in memory.
    decode_threads: threads OpenJPEG decodes one JPEG 2000 image with (its OPJ_NUM_THREADS,
    which the OpenJPEG in Pillow reads at each decode).
    """
    if decode_threads is not None:
        os.environ["OPJ_NUM_THREADS"] = str(decode_threads)
    # Identifiers (which can hold patient data) never go to pynetdicom's log.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # highdicom warns about single-component person names and quotes the name in the
    # warning: a patient's or physician's name would reach the logs. Names are copied as the
    # modality sent them (tolerant reading), so the warning has nothing to tell us.
    # Process-wide, since `warnings.catch_warnings` is not thread-safe and finalize runs in
    # threads.
    warnings.filterwarnings(
        "ignore", message=r"The string .* is unlikely to represent the intended person name"
    )
    # Tolerant reading: pydicom warns (a Python warning and a log line, each time a value is
    # read) of every value that breaks its VR's rules; one bad UID gave ten lines per
    # instance. The node checks what it relies on itself (receiving.checks: UIDs, rows,
    # columns, pixel data) and logs one line with the reason; writing stays validated.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    if receive_into is not None:
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(receive_into)  # pynetdicom's NamedTemporaryFile goes here

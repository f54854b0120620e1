"""Every task's payload is a typed model; messages an older node queued still read."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dicom_node.jobs.queue import DeliverRequest, PrepareRequest
from worker.contracts import AnalysisFailed, from_message


def test_a_payload_reads_from_its_dict() -> None:
    request = DeliverRequest(job_id="j1", destination="PACS@h:104")
    assert from_message(DeliverRequest, request.model_dump()) == request


@pytest.mark.parametrize(
    ("model", "args", "expected"),
    [
        (PrepareRequest, ("j1",), PrepareRequest(job_id="j1")),
        (
            DeliverRequest,
            ("j1", "PACS@h:104"),
            DeliverRequest(job_id="j1", destination="PACS@h:104"),
        ),
        (AnalysisFailed, ("j1", "boom"), AnalysisFailed(job_id="j1", error="boom")),
    ],
)
def test_a_message_queued_with_positional_arguments_still_reads(
    model: type[PrepareRequest | DeliverRequest | AnalysisFailed],
    args: tuple[str, ...],
    expected: object,
) -> None:
    assert from_message(model, *args) == expected


def test_a_message_with_more_arguments_than_fields_is_refused() -> None:
    with pytest.raises(ValueError, match="2 arguments for 1 fields"):
        from_message(PrepareRequest, "j1", "extra")


def test_a_payload_missing_a_field_is_refused() -> None:
    with pytest.raises(ValidationError):
        from_message(DeliverRequest, {"job_id": "j1"})
    with pytest.raises(ValidationError):
        from_message(DeliverRequest, "j1")

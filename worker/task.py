"""The inference worker's Celery task: an InferRequest in, an InferResult (or a failure) out.

It runs on any host that has the bundle (queue "infer", `cxr-node worker --roles infer`) and
touches nothing but the bundle: no ledger, no DICOM, no data folder. The node's own tasks
(prepare, finalize, deliver) are in `dicom_node.jobs.tasks`, which registers this one beside
them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery

from worker.bundle import Bundle
from worker.contracts import (
    ANALYSIS_FAILED,
    FINALIZE,
    INFER,
    NOT_ANALYSED,
    AnalysisFailed,
    GateRefusal,
    InferRequest,
    InferResult,
)
from worker.crash_guard import CrashGuard, StepKeptCrashing

log = logging.getLogger(__name__)


def register_infer(
    app: Celery,
    bundle_for: Callable[[str], Bundle],
    guard: CrashGuard,
    onnx_threads: int,
    onnx_spin: bool,
) -> None:
    """Register the `infer` task on `app`.

    bundle_for: the installed bundle with a given fingerprint - the one the image was
    preprocessed for: the current one or, just after a switch, the one before it, which
    finishes the jobs it started.
    """

    @app.task(name=INFER)
    def infer(payload: dict[str, Any]) -> None:
        request = InferRequest.model_validate(payload)
        try:
            with guard.running("inference", request.job_id):
                result = _infer(request)
        except StepKeptCrashing as exc:
            _failed(request.job_id, str(exc))
            return
        except Exception as exc:
            log.exception("job %s: inference failed", request.job_id)
            _failed(request.job_id, f"{type(exc).__name__}: {exc}")
            return
        if isinstance(result, GateRefusal):
            log.info("job %s: not analysed: %s", request.job_id, "; ".join(result.reasons))
            app.send_task(NOT_ANALYSED, args=[result.model_dump()])
            return
        app.send_task(FINALIZE, args=[result.model_dump()])

    def _failed(job_id: str, error: str) -> None:
        payload = AnalysisFailed(job_id=job_id, error=error)
        app.send_task(ANALYSIS_FAILED, args=[payload.model_dump()])

    def _infer(request: InferRequest) -> InferResult | GateRefusal:
        from worker.inference import get_ensemble, run_infer  # loads onnxruntime on first use

        wanted = bundle_for(request.bundle_fingerprint)
        bundle, ensemble = get_ensemble(wanted.root, onnx_threads, onnx_spin)
        return run_infer(request, ensemble, bundle)

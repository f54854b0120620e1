"""Thin Celery tasks: validate the payload, call one pipeline step, enqueue the next.

prepare, finalize and deliver run on the node host (queue "node"); infer runs on any worker
(queue "infer") and touches only the bundle.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task

from dicom_node import pipeline
from dicom_node.pipeline import NodeRuntime
from dicom_node.queue import ANALYSIS_FAILED, DELIVER, FINALIZE, INFER, PREPARE
from dicom_node.settings import Settings
from worker.contracts import InferRequest, InferResult

log = logging.getLogger(__name__)


def register_tasks(app: Celery, settings: Settings) -> None:
    node = NodeRuntime(settings)

    @app.task(name=PREPARE)
    def prepare(job_id: str) -> None:
        request = pipeline.prepare_or_fail(node, job_id)
        if request is not None:
            app.send_task(INFER, args=[request.model_dump()])

    @app.task(name=INFER)
    def infer(payload: dict[str, Any]) -> None:
        from worker.inference import get_ensemble, run_infer  # worker-side only

        request = InferRequest.model_validate(payload)
        try:
            # the bundle the image was preprocessed for: the current one, or (just after a
            # switch) the one before it, which finishes the jobs it started
            wanted = node.bundles.by_fingerprint(request.bundle_fingerprint)
            bundle, ensemble = get_ensemble(wanted.root, settings.onnx_threads, settings.onnx_spin)
            result = run_infer(request, ensemble, bundle)
        except Exception as exc:
            log.exception("job %s: inference failed", request.job_id)
            app.send_task(ANALYSIS_FAILED, args=[request.job_id, f"{type(exc).__name__}: {exc}"])
            return
        app.send_task(FINALIZE, args=[result.model_dump()])

    @app.task(name=ANALYSIS_FAILED)
    def analysis_failed(job_id: str, error: str) -> None:
        pipeline.analysis_failed(node, job_id, error)

    @app.task(name=FINALIZE)
    def finalize(payload: dict[str, Any]) -> None:
        result = InferResult.model_validate(payload)
        for destination in pipeline.finalize_or_fail(node, result):
            app.send_task(DELIVER, args=[result.job_id, destination])

    @app.task(name=DELIVER, bind=True, max_retries=None)
    def deliver(self: Task, job_id: str, destination: str) -> None:
        outcome = pipeline.deliver(node, job_id, destination)
        if outcome.retry_in is not None:
            raise self.retry(countdown=outcome.retry_in)

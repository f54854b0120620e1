"""Thin Celery tasks: validate the payload, call one pipeline step, enqueue the next.

prepare, finalize and deliver run on the node host (queue "node"); infer runs on any worker
(queue "infer") and touches only the bundle. The steps that run native code on the image
(prepare, infer, finalize) run under a crash guard: a step that keeps ending the worker
process fails its job instead of being run again and again (dicom_node.crash_guard).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task

from dicom_node import pipeline
from dicom_node.crash_guard import CrashGuard, StepKeptCrashing
from dicom_node.pipeline import NodeRuntime
from dicom_node.queue import ANALYSIS_FAILED, DELIVER, FINALIZE, INFER, PREPARE
from dicom_node.settings import Settings
from worker.contracts import InferRequest, InferResult

log = logging.getLogger(__name__)


def register_tasks(app: Celery, settings: Settings) -> None:
    node = NodeRuntime(settings)
    guard = CrashGuard(settings.running_dir, settings.step_crash_limit)

    @app.task(name=PREPARE)
    def prepare(job_id: str) -> None:
        try:
            with guard.running("prepare", job_id):
                request = pipeline.prepare_or_fail(node, job_id)
        except StepKeptCrashing as exc:
            pipeline.analysis_failed(node, job_id, str(exc))
            return
        if request is not None:
            app.send_task(INFER, args=[request.model_dump()])

    @app.task(name=INFER)
    def infer(payload: dict[str, Any]) -> None:
        request = InferRequest.model_validate(payload)
        try:
            with guard.running("inference", request.job_id):
                result = _infer(request)
        except StepKeptCrashing as exc:
            app.send_task(ANALYSIS_FAILED, args=[request.job_id, str(exc)])
            return
        except Exception as exc:
            log.exception("job %s: inference failed", request.job_id)
            app.send_task(ANALYSIS_FAILED, args=[request.job_id, f"{type(exc).__name__}: {exc}"])
            return
        app.send_task(FINALIZE, args=[result.model_dump()])

    def _infer(request: InferRequest) -> InferResult:
        from worker.inference import get_ensemble, run_infer  # worker-side only

        # the bundle the image was preprocessed for: the current one, or (just after a
        # switch) the one before it, which finishes the jobs it started
        wanted = node.bundles.by_fingerprint(request.bundle_fingerprint)
        bundle, ensemble = get_ensemble(wanted.root, settings.onnx_threads, settings.onnx_spin)
        return run_infer(request, ensemble, bundle)

    @app.task(name=ANALYSIS_FAILED)
    def analysis_failed(job_id: str, error: str) -> None:
        pipeline.analysis_failed(node, job_id, error)

    @app.task(name=FINALIZE)
    def finalize(payload: dict[str, Any]) -> None:
        result = InferResult.model_validate(payload)
        try:
            with guard.running("finalize", result.job_id):
                destinations = pipeline.finalize_or_fail(node, result)
        except StepKeptCrashing as exc:
            pipeline.analysis_failed(node, result.job_id, str(exc))
            return
        for destination in destinations:
            app.send_task(DELIVER, args=[result.job_id, destination])

    @app.task(name=DELIVER, bind=True, max_retries=None)
    def deliver(self: Task, job_id: str, destination: str) -> None:
        outcome = pipeline.deliver(node, job_id, destination)
        if outcome.retry_in is not None:
            raise self.retry(countdown=outcome.retry_in)

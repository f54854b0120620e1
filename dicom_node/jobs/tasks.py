"""Thin Celery tasks: validate the typed payload, call one step, enqueue the next.

prepare, finalize and deliver run on the node host (queue "node"); infer runs on any worker
(queue "infer") and touches only the bundle: it is `worker.task`, registered here beside them.
The steps that run native code on the image (prepare, infer, finalize) run under a crash
guard: a step that keeps ending the worker process fails its job instead of being run again
and again (worker.crash_guard).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from dicom_node.jobs import steps
from dicom_node.jobs.queue import (
    DELIVER,
    PREPARE,
    DeliverRequest,
    PrepareRequest,
    send_deliver,
)
from dicom_node.jobs.steps import NodeRuntime
from dicom_node.settings import Settings
from worker.contracts import (
    ANALYSIS_FAILED,
    FINALIZE,
    INFER,
    NOT_ANALYSED,
    AnalysisFailed,
    GateRefusal,
    InferResult,
    from_message,
)
from worker.crash_guard import CrashGuard, StepKeptCrashing
from worker.task import register_infer

log = logging.getLogger(__name__)


def register_tasks(app: Celery, settings: Settings) -> None:
    node = NodeRuntime(settings)
    guard = CrashGuard(settings.running_dir, settings.step_crash_limit)

    @app.task(name=PREPARE)
    def prepare(payload: dict[str, Any] | str) -> None:
        job_id = from_message(PrepareRequest, payload).job_id
        try:
            with guard.running("prepare", job_id):
                request = steps.prepare_or_fail(node, job_id)
        except StepKeptCrashing as exc:
            steps.analysis_failed(node, job_id, str(exc))
            return
        if isinstance(request, GateRefusal):  # the decoded pixels alone failed the gate
            refusal = request
            build_results(job_id, lambda: steps.not_analysed_or_fail(node, refusal))
        elif request is not None:
            app.send_task(INFER, args=[request.model_dump()])

    register_infer(
        app, node.bundles.by_fingerprint, guard, settings.onnx_threads, settings.onnx_spin
    )

    @app.task(name=ANALYSIS_FAILED)
    def analysis_failed(payload: dict[str, Any] | str, error: str | None = None) -> None:
        failure = from_message(AnalysisFailed, payload, *([] if error is None else [error]))
        steps.analysis_failed(node, failure.job_id, failure.error)

    def build_results(job_id: str, build: Callable[[], list[str]]) -> None:
        """Build a job's result objects under the crash guard, then queue their deliveries."""
        try:
            with guard.running("finalize", job_id):
                destinations = build()
        except StepKeptCrashing as exc:
            steps.analysis_failed(node, job_id, str(exc))
            return
        for destination in destinations:
            send_deliver(app, job_id, destination)

    @app.task(name=NOT_ANALYSED)
    def not_analysed(payload: dict[str, Any]) -> None:
        refusal = GateRefusal.model_validate(payload)
        build_results(refusal.job_id, lambda: steps.not_analysed_or_fail(node, refusal))

    @app.task(name=FINALIZE)
    def finalize(payload: dict[str, Any]) -> None:
        result = InferResult.model_validate(payload)
        build_results(result.job_id, lambda: steps.finalize_or_fail(node, result))

    @app.task(name=DELIVER, bind=True, max_retries=None)
    def deliver(self: Task, payload: dict[str, Any] | str, destination: str | None = None) -> None:
        request = from_message(
            DeliverRequest, payload, *([] if destination is None else [destination])
        )
        outcome = steps.deliver(node, request.job_id, request.destination)
        if outcome.retry_in is not None:
            raise self.retry(countdown=outcome.retry_in)

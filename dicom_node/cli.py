"""`cxr-node`: serve, worker, send, echo, status, retry, label."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dicom_node.settings import Settings

app = typer.Typer(
    help="CXR node: a DICOM node that scores chest X-rays (research use only).",
    no_args_is_help=True,
)
console = Console()


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # a settings error is the user's to fix: say what, not a trace
        console.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def serve() -> None:
    """Run the node: SCP, queue, node-side worker (and inference with the embedded queue)."""
    from dicom_node.security import ExposureError
    from dicom_node.service import serve as run

    try:
        run(_settings())
    except ExposureError as exc:
        console.print(f"[red]refusing to start:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated roles: infer, node")] = "infer",
    name: Annotated[str, typer.Option(help="worker name")] = "infer",
) -> None:
    """Run a Celery worker (default: inference, queue "infer"; scales out with Redis)."""
    from dicom_node.service import run_worker

    run_worker(_settings(), [q.strip() for q in queues.split(",") if q.strip()], name)


@app.command()
def echo(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="default: CXR_PORT")] = None,
    aec: Annotated[str | None, typer.Option(help="called AE; default: CXR_AE_TITLE")] = None,
    aet: Annotated[str, typer.Option(help="calling AE")] = "CXRSCU",
) -> None:
    """C-ECHO a DICOM peer (by default this node)."""
    from pynetdicom import AE

    from dicom_node.scp import VERIFICATION

    settings = _settings()
    ae = AE(ae_title=aet)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(host, port or settings.port, ae_title=aec or settings.ae_title)
    if not assoc.is_established:
        console.print("[red]association failed[/red]")
        raise typer.Exit(1)
    response = assoc.send_c_echo()
    assoc.release()
    code = getattr(response, "Status", None)
    console.print(f"C-ECHO status: {'none' if code is None else f'0x{code:04X}'}")
    if code != 0:
        raise typer.Exit(1)


@app.command()
def send(
    files: Annotated[list[Path], typer.Argument(help="DICOM files to C-STORE")],
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="default: CXR_PORT")] = None,
    aec: Annotated[str | None, typer.Option(help="called AE; default: CXR_AE_TITLE")] = None,
    aet: Annotated[str, typer.Option(help="calling AE")] = "CXRSCU",
) -> None:
    """C-STORE files to a DICOM peer (by default this node); prints each status."""
    from dicom_node.delivery import DeliveryError, send_file
    from dicom_node.settings import Destination

    settings = _settings()
    destination = Destination(
        ae_title=aec or settings.ae_title, host=host, port=port or settings.port
    )
    failed = 0
    for path in files:
        try:
            send_file(path, destination, aet)
            console.print(f"{path}: stored")
        except (DeliveryError, OSError, ValueError) as exc:
            failed += 1
            console.print(f"[red]{path}: {exc}[/red]")
    if failed:
        raise typer.Exit(1)


@app.command()
def status(
    errors: Annotated[int, typer.Option(help="how many recent errors to show")] = 10,
) -> None:
    """Jobs by state, and the most recent failures and rejections."""
    from dicom_node.ledger import Ledger

    settings = _settings()
    if not settings.ledger_path.exists():
        console.print(f"no ledger at {settings.ledger_path}: the node has received nothing yet")
        return
    ledger = Ledger(settings.ledger_path)
    table = Table(title="jobs by state")
    table.add_column("state")
    table.add_column("count", justify="right")
    for state, count in ledger.counts().items():
        table.add_row(state, str(count))
    console.print(table)
    recent = ledger.last_errors(errors)
    if recent:
        failures = Table(title="recent failures and rejections")
        for column in ("job", "state", "SOP Instance UID", "reason"):
            failures.add_column(column)
        for job in recent:
            failures.add_row(job.job_id, str(job.state), job.sop_instance_uid, job.reason or "")
        console.print(failures)


@app.command()
def retry(job_id: Annotated[str, typer.Argument(help="a failed (dead-lettered) job")]) -> None:
    """Retry a failed (dead-lettered) job: its failed deliveries, or its analysis when that
    is what failed."""
    from dicom_node.ledger import Ledger
    from dicom_node.queue import DELIVER, PREPARE, make_celery

    settings = _settings()
    ledger = Ledger(settings.ledger_path)
    destinations = ledger.retry_failed(job_id)
    if not destinations:
        if ledger.retry_analysis(job_id):
            make_celery(settings).send_task(PREPARE, args=[job_id])
            console.print(f"job {job_id}: analysis re-queued")
            return
        console.print(f"job {job_id} is not a failed job")
        raise typer.Exit(1)
    celery = make_celery(settings)
    for destination in destinations:
        celery.send_task(DELIVER, args=[job_id, destination])
    console.print(f"job {job_id}: delivery re-queued to {', '.join(destinations)}")


@app.command()
def label(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID of an analysed study")],
    diagnosis: Annotated[
        str, typer.Argument(help="covid | negative (confirmed, e.g. by PCR) | none (remove)")
    ],
) -> None:
    """Record the confirmed diagnosis of a study; later SRs show it when they list the study
    among the similar ones."""
    from dicom_node.hospital_index import DIAGNOSES, HospitalStore

    choice = diagnosis.strip().lower()
    if choice not in (*DIAGNOSES, "none"):
        console.print(f"[red]diagnosis must be one of {', '.join(DIAGNOSES)} or none[/red]")
        raise typer.Exit(2)
    settings = _settings()
    store = HospitalStore(settings.hospital_dir)
    images = store.set_diagnosis(study_uid.strip(), None if choice == "none" else choice)
    action = "removed" if choice == "none" else f"recorded as {choice}"
    console.print(f"study {study_uid}: confirmed diagnosis {action}")
    if images == 0:
        console.print(
            "note: the hospital index holds no image of this study yet; the label applies "
            "once one is analysed"
        )


if __name__ == "__main__":
    app()

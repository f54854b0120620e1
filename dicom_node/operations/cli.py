"""`cxr-node`: serve, worker, send, echo, status, retry, label, models, health, cleanup,
export-dataset."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from dicom_node.settings import Settings

if TYPE_CHECKING:
    from dicom_node.records.ledger import Ledger

app = typer.Typer(
    help="CXR node: a DICOM node that scores chest X-rays (research use only).",
    no_args_is_help=True,
    # a traceback's local variables can hold a data set's patient data: never shown
    pretty_exceptions_show_locals=False,
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
    from dicom_node.operations.service import serve as run
    from dicom_node.receiving.security import ExposureError

    try:
        run(_settings())
    except ExposureError as exc:
        console.print(f"[red]refusing to start:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option(help="comma-separated roles: infer, node, deliver")
    ] = "infer",
    name: Annotated[str, typer.Option(help="worker name")] = "infer",
) -> None:
    """Run a Celery worker (default: inference, queue "infer"; scales out with Redis)."""
    from dicom_node.operations.service import run_worker

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

    from dicom_node.receiving.scp import VERIFICATION

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
    from dicom_node.results.delivery import DeliveryError, send_file
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
    errors: Annotated[int, typer.Option(help="how many recent errors and refusals to show")] = 10,
) -> None:
    """Jobs by state, the most recent failures and rejections, and the refused instances."""
    from datetime import datetime

    from dicom_node import dimse_status
    from dicom_node.records.ledger import Ledger

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
    refusals = ledger.recent_refusals(errors)
    if refusals:
        refused = Table(title="recently refused instances (nothing stored)")
        for column in ("when", "calling AE", "address", "status", "reason"):
            refused.add_column(column)
        for r in refusals:
            when = datetime.fromtimestamp(r.at).astimezone().strftime("%Y-%m-%d %H:%M:%S")
            refused.add_row(
                when, r.calling_ae, r.address, dimse_status.describe(r.status), r.reason
            )
        console.print(refused)
    _print_figures(settings, ledger)


def _print_figures(settings: Settings, ledger: Ledger) -> None:
    """Agreement with confirmed diagnoses and drift, per bundle version (as the status page)."""
    from dicom_node.learning.live import figures_source
    from dicom_node.learning.present import DRIFT_TEST, figure_lines

    figures = figures_source(settings, ledger)()
    if not figures:
        console.print("agreement and drift: no score recorded yet")
        return
    console.print(
        f"agreement with confirmed diagnoses (score >= threshold: positive); drift: {DRIFT_TEST}",
        soft_wrap=True,
    )
    for line in figure_lines(figures, settings.drift_days):
        console.print(line, soft_wrap=True, markup=False, highlight=False)


@app.command()
def retry(job_id: Annotated[str, typer.Argument(help="a failed (dead-lettered) job")]) -> None:
    """Retry a failed (dead-lettered) job: its failed deliveries, or its analysis when that
    is what failed."""
    from dicom_node.jobs.queue import make_celery, send_deliver, send_prepare
    from dicom_node.records.ledger import Ledger

    settings = _settings()
    ledger = Ledger(settings.ledger_path)
    destinations = ledger.retry_failed(job_id)
    if not destinations:
        if ledger.retry_analysis(job_id):
            send_prepare(make_celery(settings), job_id)
            console.print(f"job {job_id}: analysis re-queued")
            return
        console.print(f"job {job_id} is not a failed job")
        raise typer.Exit(1)
    celery = make_celery(settings)
    for destination in destinations:
        send_deliver(celery, job_id, destination)
    console.print(f"job {job_id}: delivery re-queued to {', '.join(destinations)}")


@app.command()
def label(
    study_uid: Annotated[
        str | None, typer.Argument(help="Study Instance UID of an analysed study")
    ] = None,
    diagnosis: Annotated[
        str | None,
        typer.Argument(help="covid | negative (confirmed, e.g. by PCR) | none (remove)"),
    ] = None,
    csv_file: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="a file of many: a header row, a StudyInstanceUID or AccessionNumber column "
            "and a diagnosis column (docs/OPERATOR.md section 9)",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="--csv: only say what would be recorded")] = False,
) -> None:
    """Record the confirmed diagnosis of a study, or (--csv) of many. Later SRs show it when
    they list the study among the similar ones; the status page, `cxr-node status` and
    /metrics measure the model against it; `export-dataset` exports its images."""
    from dicom_node.results.hospital_index import DIAGNOSES, HospitalStore

    if csv_file is not None:
        if study_uid is not None or diagnosis is not None:
            console.print("[red]give either --csv FILE or STUDY_UID DIAGNOSIS, not both[/red]")
            raise typer.Exit(2)
        _label_csv(_settings(), csv_file, dry_run)
        return
    if study_uid is None or diagnosis is None:
        console.print("[red]give STUDY_UID and DIAGNOSIS, or --csv FILE[/red]")
        raise typer.Exit(2)
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


def _label_csv(settings: Settings, path: Path, dry_run: bool) -> None:
    from dicom_node.learning.label_csv import LabelFileError, load_label_file
    from dicom_node.records.keys import ACCESSION_KEY_FILE, load_or_create_key
    from dicom_node.records.ledger import Ledger
    from dicom_node.results.hospital_index import HospitalStore

    if not settings.ledger_path.exists():
        console.print("[red]no ledger: the node has received nothing to label yet[/red]")
        raise typer.Exit(1)
    ledger = Ledger(settings.ledger_path)
    store = HospitalStore(settings.hospital_dir)
    try:
        report = load_label_file(
            path,
            load_or_create_key(settings.keys_dir / ACCESSION_KEY_FILE),
            ledger.known_studies,
            ledger.studies_by_accession,
            store.set_diagnosis,
            dry_run=dry_run,
        )
    except (LabelFileError, OSError) as exc:
        console.print(f"[red]{path}: {exc}[/red]")
        raise typer.Exit(1) from exc
    if dry_run:
        console.print("dry run: nothing recorded")
    for line in report.lines():
        console.print(line)


models_app = typer.Typer(help="Install, list and roll back model bundles.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("install")
def models_install(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder (manifest.json, ONNX files)")],
    activate: Annotated[
        bool, typer.Option(help="make it the bundle in use now (--no-activate: copy only)")
    ] = True,
) -> None:
    """Validate a bundle (manifest, checksums, smoke inference, same class map and schema as
    the bundle in use, a device UID of its own), copy it under CXR_DATA_DIR/models and switch
    to it atomically. Running node and workers use it from their next job on."""
    from dicom_node.jobs.model_store import ModelStore, smoke_test
    from worker.bundle import BundleError

    settings = _settings()
    store = ModelStore(settings.models_dir)
    try:
        target = store.install(
            bundle,
            settings.bundle_in_use,
            lambda b: console.print(f"smoke inference: {smoke_test(b, settings.onnx_threads)}"),
            activate=activate,
        )
    except BundleError as exc:
        console.print(f"[red]bundle refused:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"installed {target}")
    if activate:
        console.print(
            "now current: new jobs use it; jobs already under way finish with the previous one "
            "(`cxr-node models rollback` returns to it)"
        )


@models_app.command("list")
def models_list() -> None:
    """The installed bundles, and which one is in use."""
    from dicom_node.jobs.model_store import ModelStore

    settings = _settings()
    table = Table(title=f"bundles in {settings.models_dir}")
    for column in ("folder", "name", "version", "device UID", "role"):
        table.add_column(column)
    for item in ModelStore(settings.models_dir).installed():
        m = item.bundle.manifest
        role = "current" if item.current else "previous" if item.previous else ""
        table.add_row(item.path.name, m.name, m.version, m.device_uid, role)
    console.print(table)
    console.print(f"in use: {settings.bundle_in_use.resolve()}")


@models_app.command("rollback")
def models_rollback() -> None:
    """Switch back to the previous bundle (atomically; from the next job on)."""
    from dicom_node.jobs.model_store import ModelStore
    from worker.bundle import BundleError

    settings = _settings()
    try:
        target = ModelStore(settings.models_dir).rollback()
    except BundleError as exc:
        console.print(f"[red]no rollback:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"current: {target}")


@app.command()
def health(
    worker: Annotated[
        bool, typer.Option(help="ask a `cxr-node worker` (CXR_WORKER_HTTP_PORT) instead")
    ] = False,
    url: Annotated[str | None, typer.Option(help="the /health URL; default: from settings")] = None,
) -> None:
    """Ask the node's (or a worker's) /health; exit status 0 when healthy, 1 when not."""
    import json
    import urllib.error
    import urllib.request

    settings = _settings()
    if url is None:
        port = settings.worker_http_port if worker else settings.http_port
        if not port:
            console.print(
                "[red]no HTTP port configured (CXR_HTTP_PORT / CXR_WORKER_HTTP_PORT)[/red]"
            )
            raise typer.Exit(2)
        host = "127.0.0.1" if settings.http_bind in ("0.0.0.0", "::", "") else settings.http_bind
        url = f"http://{host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            code, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        console.print(f"[red]{url}: {exc}[/red]")
        raise typer.Exit(1) from exc
    try:
        console.print_json(json.dumps(json.loads(body)))
    except ValueError:
        console.print(body.decode(errors="replace"))
    if code != 200:
        raise typer.Exit(1)


@app.command()
def cleanup(
    days: Annotated[
        float | None, typer.Option(help="age in days; default: CXR_RETENTION_DAYS")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="only say what would be deleted")] = False,
) -> None:
    """Delete the spooled image and result files of finished jobs (delivered or rejected)
    older than the retention period. Ledger rows, failed jobs, the outbox and the hospital
    index are kept, and (CXR_RETENTION_KEEP_LABELLED, default on) the spooled images of
    analysed instances whose study has a confirmed diagnosis."""
    import time

    from dicom_node.records.ledger import Ledger, OutputKind
    from dicom_node.records.metrics_store import MetricsStore
    from dicom_node.results.hospital_index import HospitalStore

    settings = _settings()
    keep_days = settings.retention_days if days is None else days
    if keep_days <= 0:
        console.print("retention is 0: nothing is deleted")
        return
    if not settings.ledger_path.exists():
        console.print("no ledger: nothing to clean up")
        return
    labelled: set[str] = set()
    if settings.retention_keep_labelled and (settings.hospital_dir / "hospital.sqlite3").is_file():
        labelled = set(HospitalStore(settings.hospital_dir).diagnoses())
    cutoff = time.time() - keep_days * 86400
    files = freed = jobs = kept = 0
    for job in Ledger(settings.ledger_path).finished_before(cutoff):
        paths = [settings.results_dir / f"{job.job_id}-{kind}.dcm" for kind in OutputKind]
        if job.spool_path:
            if job.study_instance_uid in labelled and job.probability is not None:
                kept += Path(job.spool_path).is_file()  # export-dataset needs it
            else:
                paths.append(Path(job.spool_path))
        existing = [p for p in paths if p.is_file()]
        jobs += bool(existing)
        for path in existing:
            files += 1
            freed += path.stat().st_size
            if not dry_run:
                path.unlink()
    if not dry_run and settings.metrics_path.exists():
        MetricsStore(settings.metrics_path).forget_once_keys(cutoff)
    verb = "would delete" if dry_run else "deleted"
    console.print(
        f"{verb} {files} files ({freed / 1e6:.1f} MB) of {jobs} jobs finished more than "
        f"{keep_days:g} days ago"
    )
    if kept:
        console.print(
            f"kept {kept} spooled images of studies with a confirmed diagnosis "
            "(CXR_RETENTION_KEEP_LABELLED; for export-dataset)"
        )


@app.command("export-dataset")
def export_dataset(
    out: Annotated[Path, typer.Argument(help="a new or empty folder")],
) -> None:
    """Write the labelled, analysed instances the spool still holds as a dataset `cxr-train`
    reads as it is (images/*.dcm, metadata.csv, export.json), with no patient identifier:
    patient groups are keyed hashes of the Patient ID. Says how many were skipped and why."""
    from rich.progress import track

    from dicom_node.learning.export import ExportError
    from dicom_node.learning.export import export_dataset as export
    from dicom_node.learning.live import bundle_folders, known_manifests
    from dicom_node.records.keys import EXPORT_KEY_FILE, load_or_create_key
    from dicom_node.records.ledger import Ledger
    from dicom_node.results.hospital_index import HospitalStore

    settings = _settings()
    if (
        not settings.ledger_path.exists()
        or not (settings.hospital_dir / "hospital.sqlite3").is_file()
    ):
        console.print("[red]nothing to export: no ledger or no confirmed diagnosis yet[/red]")
        raise typer.Exit(1)
    diagnoses = HospitalStore(settings.hospital_dir).diagnoses()
    jobs = Ledger(settings.ledger_path).jobs_of_studies(diagnoses)
    if settings.export_salt is not None:
        key = settings.export_salt.get_secret_value().encode()
    else:
        key = load_or_create_key(settings.keys_dir / EXPORT_KEY_FILE)
    names = {
        uid: f"{m.name} {m.version}" for uid, m in known_manifests(bundle_folders(settings)).items()
    }
    try:
        report = export(
            out,
            diagnoses,
            jobs,
            key,
            names,
            progress=lambda items: track(items, description="exporting", console=console),
        )
    except ExportError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    for line in report.lines():
        console.print(line)
    console.print(
        f"dataset: {out / 'metadata.csv'} (cxr-train calibrate BUNDLE {out / 'metadata.csv'})"
    )


if __name__ == "__main__":
    app()

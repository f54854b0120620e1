"""The one settings object of the node and its workers.

Read from environment variables (prefix CXR_) and an optional TOML file named by CXR_CONFIG;
environment variables win. Built once in the CLI and passed down; nothing reads it globally.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO_ROOT / "models" / "default"
PLUMBING_BUNDLE = REPO_ROOT / "tests" / "data" / "plumbing-bundle"

#: Attributes of a similar hospital study that the SR can carry (setting `hospital_fields`).
HOSPITAL_FIELDS = ("date", "score", "label", "distance")

#: Transfer syntaxes of the summary Secondary Capture (setting `summary_syntax`; the codecs
#: are in `dicom_node.results.sc.builder.SUMMARY_SYNTAXES`).
SummarySyntaxName = Literal["uncompressed", "rle", "jpeg2000-lossless", "jpeg-baseline"]

_DEST_RE = re.compile(r"^\s*([^@\s]{1,16})@([^:\s]+):(\d{1,5})\s*$")


class Destination(BaseModel, frozen=True):
    """A DICOM peer that receives the results (C-STORE SCP)."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = _DEST_RE.match(text)
        if not match:
            raise ValueError(f"destination {text!r} is not AE@host:port")
        return cls(ae_title=match[1], host=match[2], port=int(match[3]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _default_bundle() -> Path:
    return DEFAULT_BUNDLE if (DEFAULT_BUNDLE / "manifest.json").is_file() else PLUMBING_BUNDLE


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_", extra="ignore")

    ae_title: str = Field(default="CXRNODE", max_length=16, description="the node's AE title")
    port: int = Field(default=11112, ge=1, le=65535, description="DICOM listening port")
    bind: str = Field(
        default="127.0.0.1",
        description="address the SCP listens on; loopback by default: to take images from the "
        "network set it (e.g. 0.0.0.0) together with an allow-list",
    )
    data_dir: Path = Field(
        default=Path("var"), description="spool, ledger, results, outbox, queue and logs"
    )
    bundle: Path = Field(default_factory=_default_bundle, description="model bundle folder")
    broker_url: str | None = Field(
        default=None, description="unset: embedded queue; e.g. redis://127.0.0.1:6379/0"
    )
    destinations: Annotated[list[Destination], NoDecode] = Field(
        default_factory=list, description="comma-separated AE@host:port; none: the outbox folder"
    )
    allowed_calling_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated calling AE titles; empty: any"
    )
    queue_prefix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9_.-]*$",
        description="prefix of the queue names, for several nodes on one Redis",
    )
    worker_concurrency: int = Field(
        default=2, ge=1, description="task threads per inference worker process"
    )
    node_threads: int = Field(
        default=2, ge=1, description="task threads of the node host's worker (prepare, finalize)"
    )
    delivery_threads: int = Field(
        default=2,
        ge=1,
        description="task threads of the node host's delivery worker: deliveries under "
        "way at once, each holding its thread while the destination answers",
    )
    infer_process: bool = Field(
        default=True,
        description="deliveries, and with the embedded queue inference, each in a worker "
        "process of their own beside the node host's worker (no Python lock shared with "
        "finalize); false: one worker process for all the node host's queues",
    )
    onnx_threads: int = Field(default=0, ge=0, description="ONNX Runtime intra-op threads; 0: auto")
    onnx_spin: bool = Field(
        default=False,
        description="ONNX Runtime threads spin while idle: faster single images on an otherwise "
        "idle host, slower when the node's other work needs the cores",
    )
    similar_k: int = Field(
        default=4, ge=0, le=50, description="nearest reference-set items in the SR; 0: none"
    )
    similar_labels: bool = Field(
        default=True,
        description="show labels of similar items in the SR (reference-set labels and "
        "confirmed diagnoses of hospital studies)",
    )
    hospital_index: bool = Field(
        default=True,
        description="keep every analysed image's embedding in the hospital index (data_dir/"
        "hospital); off: nothing is stored there and the SR lists no hospital studies",
    )
    hospital_k: int = Field(
        default=4,
        ge=0,
        le=50,
        description="most similar earlier hospital studies in the SR; 0: none",
    )
    hospital_fields: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(HOSPITAL_FIELDS),
        description="comma-separated attributes of similar hospital studies written into the SR, "
        "besides their UIDs: date (study date), score (AI probability), label (confirmed "
        "diagnosis), distance (embedding distance); empty: UIDs only",
    )
    produce_sc: bool = Field(
        default=True, description="send a Secondary Capture summary image with the SR"
    )
    produce_seg: bool = Field(default=False, description="send the lung mask as DICOM SEG")
    not_analysed_sr: bool = Field(
        default=True,
        description="when the bundle's input gate refuses an image (not a frontal chest "
        "radiograph the model is for), send an SR into the study that says it was not analysed "
        "and why; false: record it (ledger, status, metrics) and send nothing",
    )
    summary_width: int = Field(
        default=1024, ge=512, le=4096, description="width in pixels of the summary image"
    )
    summary_syntax: SummarySyntaxName = Field(
        default="jpeg-baseline",
        description="transfer syntax the summary image is stored and sent in: jpeg-baseline "
        "(lossy, quality 95, 0.28 MB for a 1024 px summary, marked lossy, 11 ms to encode), "
        "jpeg2000-lossless (0.52 MB, 185 ms), rle (3.5 MB, 103 ms), uncompressed (4.0 MB); "
        "a destination "
        "that does not accept the compressed syntax gets it uncompressed, same UIDs and "
        "pixels (docs/BENCHMARKS.md, Summary image compressed)",
    )
    delivery_attempts: int = Field(default=6, ge=1, description="C-STORE tries per destination")
    delivery_backoff_s: float = Field(
        default=5.0, gt=0, description="first retry delay; doubles each try, capped at 10 min"
    )
    visibility_timeout_s: int = Field(
        default=1800, ge=10, description="Redis: an unacknowledged task is redelivered after this"
    )
    step_crash_limit: int = Field(
        default=3,
        ge=1,
        description="runs of a job's step that may end the worker process (crash, OOM kill) "
        "before the job fails instead of being run again",
    )
    max_pixels: int = Field(default=100_000_000, description="refuse images with more pixels")
    min_free_disk_mb: int = Field(
        default=500, ge=0, description="refuse new instances (0xA700) below this free space"
    )
    log_level: str = Field(default="INFO")
    log_format: Literal["text", "json"] = Field(
        default="text", description="log lines as text, or one JSON object per line"
    )
    http_port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        description="HTTP port of the node: /metrics (Prometheus), /health, status page at /; "
        "0: no HTTP server",
    )
    http_bind: str = Field(
        default="127.0.0.1",
        description="address the HTTP server listens on (0.0.0.0 to let Prometheus scrape it "
        "from another host)",
    )
    worker_http_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="HTTP port of a `cxr-node worker` process for its /health and /metrics; "
        "0: none",
    )
    retention_days: float = Field(
        default=30.0,
        ge=0,
        description="`cxr-node cleanup` deletes the spooled image and result files of finished "
        "jobs older than this; 0: keep everything",
    )
    retention_keep_labelled: bool = Field(
        default=True,
        description="`cxr-node cleanup` keeps the spooled image of every analysed instance "
        "whose study has a confirmed diagnosis (what `cxr-node export-dataset` needs); false: "
        "deleted after retention_days like the others",
    )
    # --- confirmed diagnoses: agreement, drift, export (docs/OPERATOR.md section 9) ---
    agreement_bootstrap: int = Field(
        default=1000,
        ge=0,
        le=100_000,
        description="bootstrap resamples (stratified, seed 0) of the 95 % CI of the live ROC "
        "AUC; 0: no interval",
    )
    drift_days: float = Field(
        default=30.0,
        gt=0,
        description="the drift check compares the scores of the instances received in the "
        "last this many days with the bundle's reference score distribution",
    )
    drift_alpha: float = Field(
        default=0.01,
        gt=0,
        lt=1,
        description="drift warning when the two-sample Kolmogorov-Smirnov test's p-value is "
        "below this",
    )
    drift_min_scores: int = Field(
        default=30, ge=2, description="fewer recent scores than this: no drift test is made"
    )
    export_salt: SecretStr | None = Field(
        default=None,
        description="key of the patient-group hash in `cxr-node export-dataset` (the same "
        "value on several nodes gives the same groups); unset: a random key made once in "
        "data_dir/keys/export.key. Never exported",
    )
    # --- who may talk to the node, and how much (docs/RELIABILITY.md) ---
    allowed_addresses: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated source addresses or networks (CIDR) allowed to connect; "
        "empty: any",
    )
    accept_any_caller: bool = Field(
        default=False,
        description="allow `serve` on a non-loopback address without a calling AE or address "
        "allow-list (off: the node refuses to start so)",
    )
    tls_cert: Path | None = Field(
        default=None, description="PEM certificate of the node: DICOM TLS on the SCP port"
    )
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert")
    tls_ca: Path | None = Field(
        default=None, description="PEM CA bundle that client certificates are checked against"
    )
    tls_require_client_cert: bool = Field(
        default=False, description="TLS: refuse peers without a certificate signed by tls_ca"
    )
    max_associations: int = Field(
        default=10, ge=1, description="concurrent associations; more are rejected (transient)"
    )
    max_pdu_size: int = Field(
        default=1_048_576, ge=0, description="largest P-DATA PDU the node accepts; 0: unlimited"
    )
    max_instance_mb: int = Field(
        default=256,
        ge=1,
        description="refuse larger instances (0xA700); abort a transfer past twice this",
    )
    acse_timeout_s: float = Field(
        default=30, gt=0, description="wait for association requests and releases"
    )
    dimse_timeout_s: float = Field(default=60, gt=0, description="wait for DIMSE messages")
    network_timeout_s: float = Field(
        default=60, gt=0, description="an association idle this long is closed"
    )
    recovery_interval_s: float = Field(
        default=60,
        gt=0,
        description="how often the node checks the ledger for work to re-enqueue (and the "
        "broker for a restart)",
    )
    display_cache_mb: int = Field(
        default=256,
        ge=0,
        description="memory for decoded images kept between a job's prepare and finalize "
        "steps (spares a second decode); 0: decode twice",
    )
    decode_at_size: bool = Field(
        default=True,
        description="decode JPEG 2000 and JPEG baseline monochrome images directly at the "
        "reduced size the outputs need (resolution levels, DCT scaling: at least 0.85 of "
        "the summary width, shorter side twice the largest model input); the SR's outline, "
        "the SEG and the input gate's size check stay on the source's pixel grid; false: "
        "always decode in full",
    )
    decode_threads: int = Field(
        default=2,
        ge=1,
        description="threads that decode one JPEG 2000 image (OpenJPEG's OPJ_NUM_THREADS in "
        "the worker processes): 2 roughly halve a JPEG 2000 CR's decode wait on 2 cores "
        "(bench/decode_at_size.py --decode-threads)",
    )
    embedded_poll_s: float = Field(
        default=0.02,
        gt=0,
        le=10,
        description="embedded queue: seconds between looks for new messages when idle, and "
        "before a worker thread that has finished gets its next task (kombu stops fetching "
        "while every thread holds one); 0.02: about 1 % of a core when idle "
        "(docs/BENCHMARKS.md, Burst profile)",
    )
    receiver_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="processes receiving C-STORE on the DICOM port (SO_REUSEPORT, write-to-file "
        "receive); 1: the SCP runs in the node process",
    )

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: Any) -> Any:
        value = _split_csv(value)
        if isinstance(value, list):
            return [Destination.parse(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("hospital_fields", mode="before")
    @classmethod
    def _parse_fields(cls, value: Any) -> Any:
        value = _split_csv(value)
        if isinstance(value, list):
            unknown = [v for v in value if v not in HOSPITAL_FIELDS]
            if unknown:
                raise ValueError(
                    f"unknown hospital field(s) {unknown}: choose from {', '.join(HOSPITAL_FIELDS)}"
                )
        return value

    @field_validator("allowed_calling_aes", mode="before")
    @classmethod
    def _parse_aes(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("allowed_addresses", mode="before")
    @classmethod
    def _parse_addresses(cls, value: Any) -> Any:
        value = _split_csv(value)
        if isinstance(value, list):
            for item in value:
                ipaddress.ip_network(str(item), strict=False)  # ValueError says which
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither")
        if self.tls_require_client_cert and (self.tls_cert is None or self.tls_ca is None):
            raise ValueError("tls_require_client_cert needs tls_cert, tls_key and tls_ca")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("CXR_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"CXR_CONFIG={config_file} does not exist")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    # Derived locations, all under data_dir.
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def running_dir(self) -> Path:
        """Markers of the job steps running now (worker.crash_guard)."""
        return self.data_dir / "running"

    @property
    def hospital_dir(self) -> Path:
        return self.data_dir / "hospital"

    @property
    def keys_dir(self) -> Path:
        """The node's keys of its keyed hashes (`dicom_node.records.keys`); never exported."""
        return self.data_dir / "keys"

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.sqlite3"

    @property
    def models_dir(self) -> Path:
        """Bundles installed with `cxr-node models install`, and the `current` link."""
        return self.data_dir / "models"

    @property
    def bundle_in_use(self) -> Path:
        """The bundle the node and workers use: the installed `current` one if there is one,
        otherwise `bundle`. A path through the link, so a switch is seen on the next use."""
        current = self.models_dir / "current"
        return current if current.exists() else self.bundle

    @property
    def audit_path(self) -> Path:
        return self.log_dir / "audit.jsonl"

    @property
    def metrics_path(self) -> Path:
        return self.data_dir / "metrics.sqlite3"

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    def make_dirs(self) -> None:
        for path in (
            self.spool_dir,
            self.results_dir,
            self.outbox_dir,
            self.queue_dir,
            self.log_dir,
        ):
            path.mkdir(parents=True, exist_ok=True)

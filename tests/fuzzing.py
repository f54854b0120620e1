"""A seeded DICOM mutator and the node's decoder path as a fuzz target.

Seeds: small synthetic chest CRs in the encodings the node accepts (explicit and implicit VR,
RLE, JPEG 2000, JPEG-LS; a VOI LUT, a window, MONOCHROME1). Case `i` of seed `s` is always
the same bytes (`mutate(seeds, Random(f"{s}:{i}"))`), so a finding is reproduced by its
number alone.

The target does what the node does with received bytes, in the same order:
parse (pydicom) -> `check_instance` -> `decode_display_at` -> `preprocess` (with a target
size the small seeds meet, so that the JPEG 2000 seed goes through the reduced-size decoder
too). Its documented outcomes: any exception while parsing or checking (the SCP answers
0xC000), a refusal or a not-analysable verdict, `PixelDecodeError` (the job is rejected with
the reason), or an analysable image. Anything else raised by the decoder or preprocessing
is a finding; so is a crash of the process, a case that runs past its time limit, or memory
past the limit.

`python -m tests.fuzzing SEED FIRST COUNT` runs cases in this process, under an address-space
limit, printing one line per case (`index outcome peak-rss-kB`); `run_campaign` runs it as a
child process and watches for crashes and hangs.
"""

from __future__ import annotations

import io
import random
import resource
import select
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.uid import (
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

REPO = Path(__file__).resolve().parent.parent
MAX_PIXELS = 100_000_000  # the node's default
#: Reduced-size decoding's target (dicom_node.results.reduced_decode.TargetSize): the 64 px
#: seeds are decoded at 1/4 where their codec allows it.
FUZZ_TARGET_SIDE = 16
MEMORY_LIMIT = 3 * 1024**3  # address space of the process running the cases
INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80")


def _fixed(ds: Dataset, n: int) -> Dataset:
    for i, keyword in enumerate(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")):
        setattr(ds, keyword, f"1.2.826.0.1.3680043.10.543.{n}.{i}")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _bytes(ds: Dataset, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, **kwargs)  # type: ignore[arg-type]
    return buffer.getvalue()


def make_seeds() -> list[bytes]:
    from tests.synthetic import synthetic_cr

    seeds = [_bytes(_fixed(synthetic_cr(64, seed=1), 1), enforce_file_format=True)]

    ds = _fixed(synthetic_cr(64, seed=2), 2)
    pixels = (np.frombuffer(ds.PixelData, np.uint16) >> 4).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = pixels.tobytes()
    ds.WindowCenter, ds.WindowWidth = 128, 200
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    seeds.append(_bytes(ds, enforce_file_format=True))

    ds = _fixed(synthetic_cr(64, seed=3), 3)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    lut = Dataset()
    lut[0x00283002] = DataElement(0x00283002, "US", [4096, 0, 16])
    curve = (np.sqrt(np.linspace(0, 1, 4096)) * 65535).astype(np.uint16).tolist()
    lut[0x00283006] = DataElement(0x00283006, "US", curve)
    ds.VOILUTSequence = [lut]
    seeds.append(_bytes(ds, enforce_file_format=True))

    for n, syntax in enumerate((RLELossless, JPEG2000Lossless, JPEGLSLossless), start=4):
        ds = _fixed(synthetic_cr(64, seed=n), n)
        ds.compress(syntax)
        seeds.append(_bytes(ds, enforce_file_format=True))
    return seeds


def meta_end(data: bytes) -> int:
    """Where the File Meta Information ends (pydicom writes its group length first)."""
    return 144 + int.from_bytes(data[140:144], "little")


def mutate(seeds: list[bytes], rng: random.Random, keep_meta: bool = False) -> bytes:
    """One to eight mutations of a seed: bit flips, interesting values (often over length
    fields), truncation, insertion, deletion, duplication, splicing with another seed.
    With keep_meta, the File Meta Information is left intact (for sending over the wire)."""
    data = bytearray(rng.choice(seeds))
    # mostly past the preamble and "DICM"; with keep_meta past the File Meta Information
    start = meta_end(bytes(data)) if keep_meta else 132 if rng.random() < 0.9 else 0
    for _ in range(rng.randint(1, 8)):
        if len(data) <= start + 8:
            break
        at = rng.randrange(start, len(data))
        kind = rng.randrange(8)
        if kind == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            value = rng.choice(INTERESTING)
            data[at : at + len(value)] = value
        elif kind == 2:
            del data[at:]
        elif kind == 3:
            data[at:at] = rng.randbytes(rng.randint(1, 64))
        elif kind == 4:
            del data[at : at + rng.randint(1, 64)]
        elif kind == 5:
            chunk = data[at : at + rng.randint(1, 256)]
            data[at:at] = chunk
        elif kind == 6:
            other = rng.choice(seeds)
            cut = rng.randrange(min(start, len(other) - 1), len(other))
            data = data[:at] + other[cut:]
        else:  # a 2- or 4-byte length or value turned large
            size = rng.choice((2, 4))
            data[at : at + size] = rng.randrange(256**size).to_bytes(size, "little")
    return bytes(data)


def target(data: bytes) -> str:
    """The node's path for received bytes; returns the outcome, raises on a finding."""
    from dicom_node.receiving.checks import Verdict, check_instance
    from dicom_node.results.pixels import PixelDecodeError
    from dicom_node.results.reduced_decode import TargetSize, decode_display_at
    from worker.preprocess import PreprocessParams, preprocess

    try:
        ds = dcmread(io.BytesIO(data), force=True)
        check = check_instance(ds, str(ds.get("SOPClassUID", "")), MAX_PIXELS)
    except Exception:  # the SCP answers 0xC000 (cannot understand)
        return "unreadable"
    if check.verdict is Verdict.REFUSE:
        return "refused"
    if check.verdict is Verdict.NOT_ANALYSABLE:
        return "not-analysable"
    try:
        small = TargetSize(min_width=FUZZ_TARGET_SIDE, min_side=FUZZ_TARGET_SIDE)
        display = decode_display_at(ds, small, max_pixels=MAX_PIXELS)
    except PixelDecodeError as exc:
        return f"rejected:{exc.reason.value}"
    preprocess(display.image, PreprocessParams())
    return "analysable"


def _run_cases(seed: int, first: int, count: int) -> None:
    import warnings

    warnings.simplefilter("ignore")
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    seeds = make_seeds()
    print("ready", flush=True)
    for index in range(first, first + count):
        data = mutate(seeds, random.Random(f"{seed}:{index}"))
        try:
            outcome = target(data)
        except BaseException as exc:
            outcome = f"FINDING:{type(exc).__name__}"
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(index, outcome, peak_kb, flush=True)


@dataclass
class Report:
    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)  # "case N: what"
    peak_rss_kb: int = 0
    seconds: float = 0.0


def run_campaign(seed: int, count: int, case_timeout_s: float = 30.0) -> Report:
    """Run cases 0..count-1 in child processes; a crash or a hang costs that case only."""
    report = Report()
    started = time.monotonic()
    index = 0
    while index < count:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzzing", str(seed), str(index), str(count - index)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
            text=True,
        )
        assert child.stdout is not None
        limit = 120.0  # start-up: imports and seeds
        while True:
            ready, _, _ = select.select([child.stdout], [], [], limit)
            if not ready:
                child.kill()
                child.wait()
                report.findings.append(f"case {index}: no answer within {limit:.0f} s (hang)")
                index += 1
                break
            line = child.stdout.readline()
            if not line:  # the child ended
                code = child.wait()
                if index < count:
                    report.findings.append(f"case {index}: the process died ({code})")
                    index += 1
                break
            limit = case_timeout_s
            parts = line.split()
            if parts[0] == "ready":
                continue
            index = int(parts[0]) + 1
            report.cases += 1
            report.outcomes[parts[1]] += 1
            report.peak_rss_kb = max(report.peak_rss_kb, int(parts[2]))
            if parts[1].startswith("FINDING"):
                report.findings.append(f"case {parts[0]}: {parts[1]}")
    report.seconds = time.monotonic() - started
    return report


if __name__ == "__main__":
    _run_cases(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))

"""RLE decoding speed: pylibjpeg-rle against pydicom's own decoder, on a real chest CR.

    python bench/run.py rle_decoders [--repeats 7]

The CR is RG1_UNCI (NEMA WG04, 1955 x 1841, pydicom-data), compressed to RLE Lossless by
pydicom; each decoder decodes it `repeats` times, alternating, twice; the median is printed.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array
from pydicom.uid import RLELossless

PLUGINS = ("pylibjpeg", "pydicom")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="one repeat: check that it runs")
    args = parser.parse_args()
    repeats = 1 if args.smoke else args.repeats
    path = get_testdata_file("RG1_UNCI.dcm", download=False)
    if path is None:
        raise SystemExit("pydicom-data is not installed")
    ds = dcmread(path)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    buffer = io.BytesIO()
    ds.save_as(buffer)
    raw = buffer.getvalue()
    times: dict[str, list[float]] = {plugin: [] for plugin in PLUGINS}
    for _ in range(2):
        for plugin in PLUGINS:
            for _ in range(repeats):
                one = dcmread(io.BytesIO(raw))
                started = time.perf_counter()
                pixel_array(one, decoding_plugin=plugin)
                times[plugin].append(time.perf_counter() - started)
    print(f"RG1_UNCI as RLE: {ds.Rows} x {ds.Columns}, {len(ds.PixelData)} bytes\n")
    print("| decoder | median ms | decodes |\n|---|---|---|")
    for plugin, measured in times.items():
        median = statistics.median(measured) * 1000
        print(f"| {plugin} | {median:.0f} | {len(measured)} |")


if __name__ == "__main__":
    main()

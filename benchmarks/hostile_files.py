"""Build the hostile files of issue 31 and open one of them as cxr does, for `/usr/bin/time -v` to measure
(docs/robustness.md, "Hostile files: peak memory"). Usage:
  python benchmarks/hostile_files.py build DIR          # writes the files below (about 200 MB in all)
  python benchmarks/hostile_files.py decode FILE [old]  # cxr.data.imageio.decode_image(FILE, 256); old: as at 7c63fbc
  python benchmarks/hostile_files.py load FILE          # cxr.models.checkpoint.load_checkpoint(FILE)
"""
import io
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _deflated_dicom(path: Path, rows: int, columns: int, frames: int = 1) -> None:
    """A deflated DICOM whose header promises ``frames`` x ``rows`` x ``columns`` 8-bit pixels, all zero,
    deflated in steps so that building it never holds the inflated data."""
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    from cxr.data.synthetic import write_dicom

    write_dicom(path, np.zeros((8, 8), np.uint8))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    plain, deflated = io.BytesIO(), io.BytesIO()
    ds.save_as(plain, enforce_file_format=True)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(deflated, enforce_file_format=True)
    offsets = []
    for buffer in (plain, deflated):
        buffer.seek(0)
        read_preamble(buffer, False)
        _read_file_meta_info(buffer)
        offsets.append(buffer.tell())
    size = rows * columns * frames
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as out:
        out.write(deflated.getvalue()[:offsets[1]])
        out.write(packer.compress(plain.getvalue()[offsets[0]:] + b"\xe0\x7f\x10\x00OB\x00\x00" + size.to_bytes(4, "little")))
        zeros = bytes(2**24)
        for start in range(0, size, len(zeros)):
            out.write(packer.compress(zeros[: min(len(zeros), size - start)]))
        out.write(packer.flush())


def _multi_frame(path: Path, frames: int, side: int) -> None:
    import pydicom

    from cxr.data.synthetic import write_dicom

    write_dicom(path, np.zeros((side, side), np.uint8))
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = frames
    ds.PixelData = np.random.default_rng(0).integers(0, 256, (frames, side, side), dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _many_scans(path: Path, copies: int) -> None:
    Image.fromarray(np.tile(np.linspace(0, 255, 256), (256, 1)).astype(np.uint8)).save(path, progressive=True)
    data = path.read_bytes()
    last = data.rindex(b"\xff\xda")
    path.write_bytes(data[:last] + data[last:-2] * copies + data[-2:])


def build(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.tile(np.linspace(0, 65535, 9400), (9400, 1)).astype(np.uint16)).save(folder / "png16_9400.png")
    Image.fromarray(np.tile(np.linspace(0, 255, 2048), (2048, 1)).astype(np.uint8)).save(folder / "png8_2048.png")
    float_values = np.tile(np.linspace(0, 1, 4000, dtype=np.float32), (4000, 1))
    float_values[7, 7] = np.nan
    Image.fromarray(float_values, mode="F").save(folder / "float_nan_4000.tif")
    _deflated_dicom(folder / "deflated_30000.dcm", 30_000, 30_000)
    _deflated_dicom(folder / "deflated_9000x40.dcm", 9_000, 9_000, 40)  # every frame allowed, 3.2 GB inflated
    _multi_frame(folder / "frames_600.dcm", 600, 512)
    _many_scans(folder / "scans_20000.jpg", 20_000)
    with zipfile.ZipFile(folder / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data.pkl", "w", force_zip64=True) as record:
            zeros = bytes(2**24)
            for _ in range(64):  # 1 GiB inflated
                record.write(zeros)
    for path in sorted(folder.iterdir()):
        print(f"{path.name}: {path.stat().st_size:,} bytes")


def decode(path: str, old: bool) -> None:
    if old:
        sys.path.insert(0, "/work/runs/i31a/old")  # git show 7c63fbc:src/cxr/data/imageio.py > .../old/old_imageio.py
        from old_imageio import decode_image
    else:
        from cxr.data.imageio import decode_image
    started = time.perf_counter()
    try:
        print(decode_image(path, 256).shape, end=" ")
    except ValueError as error:
        print(f"refused: {error}", end=" ")
    print(f"{time.perf_counter() - started:.2f} s")


def load(path: str) -> None:
    from cxr.models.checkpoint import CheckpointError, load_checkpoint

    try:
        load_checkpoint(path)
    except CheckpointError as error:
        print(f"refused: {error}")


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "build":
        build(Path(sys.argv[2]))
    elif command == "decode":
        decode(sys.argv[2], len(sys.argv) > 3 and sys.argv[3] == "old")
    else:
        load(sys.argv[2])

"""A local demo page (``cxr serve``): choose or drop an image, see the predicted class, every class's
probability as bars and the Grad-CAM overlay.

Built with Gradio, an optional dependency (the ``demo`` extra), imported only here so the core install
stays lean. Each upload goes through ``cxr.inference.predict.predict_images`` with the model loaded once, so the page
shows exactly the probabilities ``cxr predict`` prints. Nothing leaves the machine: Gradio's analytics are
off, no share link is made, and by default the page listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cxr.data.dataset import IMAGE_EXTENSIONS
from cxr.inference.export import load_for_inference
from cxr.inference.predict import predict_images, read_image
from cxr.common.runtime import Runtime
from cxr.data.preprocessing import Preprocessing

# The model's input is small (224 px, 32 in tests): show it as large as its box, pixels as squares.
CSS = "#cam img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
INSTALL_HINT = "uv sync --extra demo"
# Uploads larger than this are refused by Gradio before they are stored (HTTP 413): an uncompressed 16-bit
# 3000 x 3000 DICOM radiograph is 18 MB, so 64 MB leaves room without letting anyone fill the disk or memory.
MAX_UPLOAD_BYTES = 64 * 2**20
# Gradio also keeps what it shows (the overlay, a patient's pixels): every minute, files older than 5 go.
DELETE_CACHE = (60, 300)
# Uploads decoded at once: a slow file (a JPEG of many scans decodes up to the scan limit) then holds one of
# these, not the page; the model itself runs one upload at a time (Grad-CAM hooks the shared model).
CONCURRENT_UPLOADS = 4


class ServeError(RuntimeError):
    """The page cannot start: Gradio (the ``demo`` extra) is missing, or the address cannot be listened on."""


def import_gradio() -> Any:
    """Gradio with its usage analytics off (set before the import, which reads it)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise ServeError(f"the demo page needs the 'demo' extra ({error.name} is missing): {INSTALL_HINT}") from None
    return gradio


@dataclass
class Predictor:
    """A checkpoint's model, classes and preprocessing, loaded once for every upload."""

    model: torch.nn.Module
    classes: list[str]
    preprocessing: dict[str, Any]
    runtime: Runtime
    name: str
    header: str = ""
    model_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, device: str | None = None) -> "Predictor":
        runtime = Runtime.create(device, progress=False)  # a bad --device is refused before the model loads
        model, classes, prep = load_for_inference(checkpoint)
        return cls(model, classes, prep, runtime, Path(checkpoint).name, model_header(checkpoint))

    def classify(self, path: str | os.PathLike) -> tuple[dict[str, float], np.ndarray]:
        """Every class's probability and the image beside its Grad-CAM (uint8 RGB); ValueError with the
        reason when the file cannot be read as an image."""
        side = Preprocessing.from_dict(self.preprocessing).square_side
        square, reason = read_image(Path(path), side)  # decoded outside the lock
        if square is None:
            raise ValueError(f"{Path(path).name}: {reason}")
        with tempfile.TemporaryDirectory(prefix="cxr-serve-") as cam_dir:
            decoded = Path(cam_dir) / "decoded.png"  # the square itself: decoding it again gives it unchanged
            Image.fromarray(square).save(decoded)
            with self.model_lock:
                result = predict_images(self.model, self.classes, self.preprocessing, [decoded], self.runtime,
                                        cam_dir=Path(cam_dir))
            if result.failures:
                raise ValueError(f"{Path(path).name}: {result.failures[0][1]}")
            with Image.open(result.cam_files[0]) as pair:
                overlay = np.asarray(pair.convert("RGB"))
        row = result.table.iloc[0]
        return {name: float(row[name]) for name in self.classes}, overlay


def model_header(checkpoint: str | os.PathLike) -> str:
    """Which model the page runs, in one line: experiment, checkpoint and epoch, commit and test macro-F1, read
    from the export's model.json or, for a checkpoint, from its run's metrics.json when that describes it."""
    from cxr.models.checkpoint import load_checkpoint
    from cxr.inference.export import _run_metrics, read_description

    path = Path(checkpoint)
    if path.is_dir():
        description = read_description(path)
        name, found = description["experiment"]["name"], description.get("metrics") or {}
    else:
        state = load_checkpoint(path)
        name, found = state["experiment"]["name"], _run_metrics(path, state)
    test = found.get("test") or {}
    score = test.get("macro_f1")
    interval = (test.get("ci95") or {}).get("macro_f1")
    scored = ("test macro-F1 unknown (no metrics.json of this checkpoint beside it)" if score is None else
              f"test macro-F1 {score:.3f}" + (f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})" if interval else ""))
    return (f"Experiment `{name}`, `{path.name}` (epoch {found.get('epoch', '?')}), commit "
            f"`{found.get('commit') or 'unknown'}`, {scored}")


def probability_table(probabilities: dict[str, float]) -> str:
    """Markdown table of the probabilities to six decimals, as ``cxr predict --csv`` writes them."""
    rows = "\n".join(f"| {name} | {value:.6f} |" for name, value in probabilities.items())
    return f"| class | probability |\n|---|---|\n{rows}"


def discard_upload(path: str | os.PathLike, uploads: Path | None) -> None:
    """Delete an upload once it is classified (Gradio keeps every one, in a folder of its own, until its
    cache is cleared): only a file inside this server's ``uploads`` folder, and its folder once empty."""
    path = Path(path)
    if uploads is None or not path.resolve().is_relative_to(uploads.resolve()):
        return
    path.unlink(missing_ok=True)
    if path.parent.resolve() != uploads.resolve():
        try:
            path.parent.rmdir()
        except OSError:  # not empty: another file is still in use
            pass


def build_demo(predictor: Predictor, uploads: Path | None = None) -> Any:
    """The page: a file picker (drop or choose), the class probabilities as bars, the Grad-CAM overlay.
    Uploads inside ``uploads`` (this server's Gradio folder) are deleted once classified."""
    gr = import_gradio()

    def cleared() -> tuple[None, None, str]:
        return None, None, ""

    def classify(path: str | None) -> tuple[dict[str, float], np.ndarray, str]:
        if path is None:
            raise gr.Error("choose an image first", print_exception=False)
        try:
            probabilities, overlay = predictor.classify(path)
        except ValueError as error:  # shown on the page; no traceback in the server's console
            raise gr.Error(str(error), print_exception=False) from None
        finally:
            discard_upload(path, uploads)
        return probabilities, overlay, probability_table(probabilities)

    kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
    with gr.Blocks(title="cxr demo", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"## Chest X-ray classification\n{predictor.header or f'Checkpoint `{predictor.name}`'}; classes "
                    f"{', '.join(predictor.classes)}, on {predictor.runtime.device}. A research demo, not a diagnosis.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label=f"Image ({kinds})", file_types=sorted(IMAGE_EXTENSIONS), elem_id="upload")
                table = gr.Markdown(elem_id="probability-table")
            with gr.Column():
                label = gr.Label(num_top_classes=len(predictor.classes), label="Prediction", elem_id="prediction")
                cam = gr.Image(label="Image and Grad-CAM of the predicted class", interactive=False, height=300,
                               elem_id="cam")
        outputs = [label, cam, table]
        # A new upload first clears the last result, so a failed one never leaves another image's result showing.
        upload.upload(cleared, outputs=outputs, api_visibility="private", queue=False).then(
            classify, inputs=upload, outputs=outputs, api_name="classify", concurrency_limit=CONCURRENT_UPLOADS)
        upload.clear(cleared, outputs=outputs, api_visibility="private", queue=False)
    return demo


def serve(checkpoint: str | os.PathLike, host: str = "127.0.0.1", port: int | None = None,
          device: str | None = None, block: bool = True, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> Any:
    """Load the checkpoint and start the page; blocks until Ctrl-C unless ``block`` is False (then call
    ``.close()`` on the returned demo). Uploads over ``max_upload_bytes`` are refused. Raises ServeError or
    CheckpointError."""
    import_gradio()
    predictor = Predictor.load(checkpoint, device)
    try:
        demo, remove_uploads = _with_private_uploads(predictor)
    except OSError as error:
        raise ServeError(f"cannot create a folder for the uploads ({error}); set GRADIO_TEMP_DIR to a folder "
                         "you can write to") from None
    try:
        demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True,
                    show_error=True, footer_links=["api", "settings"], css=CSS, max_file_size=max_upload_bytes)
    except OSError as error:
        remove_uploads()
        where = f"{host}:{port}" if port else f"{host} (ports 7860-7959)"
        raise ServeError(f"cannot listen on {where}: the port is taken or the address is not this machine's "
                         f"({error}); choose another --port or --host") from None
    print(f"Demo page: {demo.local_url} (Ctrl-C stops it)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"Listening on {host}: anyone who can reach port {demo.server_port} of this machine can use the page.")
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo


def _with_private_uploads(predictor: Predictor) -> tuple[Any, Any]:
    """The page, with Gradio's uploads and cache in a folder of this server's own (inside $GRADIO_TEMP_DIR
    when set), removed with everything in it when the page closes; and that removal, for a failed start."""
    previous = os.environ.get("GRADIO_TEMP_DIR")
    if previous:  # Gradio creates it on the first upload; the private folder goes inside it now
        Path(previous).mkdir(parents=True, exist_ok=True)
    uploads = Path(tempfile.mkdtemp(prefix="cxr-serve-uploads-", dir=previous or None))
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)  # Gradio reads it at each upload
    demo = build_demo(predictor, uploads)
    close = demo.close

    def remove_uploads() -> None:
        shutil.rmtree(uploads, ignore_errors=True)
        if os.environ.get("GRADIO_TEMP_DIR") == str(uploads):
            if previous is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = previous

    def close_and_remove_uploads(*args: Any, **kwargs: Any) -> Any:
        try:
            return close(*args, **kwargs)
        finally:
            remove_uploads()

    demo.close = close_and_remove_uploads
    return demo, remove_uploads
